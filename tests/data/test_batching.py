"""Padding, collation, packing and step-planned batching."""

import random
from functools import partial

import pytest
import torch

from lit_align.data import InstructionDataModule
from lit_align.data.batching import (
    PlannedBatches,
    ResumableLoader,
    collate_generation,
    collate_packed,
    collate_rows,
    pack_rows,
    pad,
    plan_batches,
)
from lit_align.data.encode import IGNORE_INDEX
from tests.data.util import byte_tokenizer, write_jsonl

X = IGNORE_INDEX


def row(ids, labels, prompt_len=0, reference="", meta=None):
    return {"input_ids": ids, "labels": labels, "prompt_ids": ids[:prompt_len], "reference": reference,
            "meta": meta, "length": len(ids), "num_labels": sum(label != X for label in labels)}


def test_pad_right_and_left():
    seqs = [[1, 2, 3], [4], []]
    assert pad(seqs, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad(seqs, -1, side="left").tolist() == [[1, 2, 3], [-1, -1, 4], [-1, -1, -1]]
    assert pad(seqs, 9, length=5).tolist() == [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9], [9] * 5]
    assert pad(seqs, 0).dtype == torch.long


def test_collate_rows_right_pads_with_masks():
    rows = [row([5, 6, 7], [X, 6, 7]), row([8, 9], [X, 9])]
    batch = collate_rows(rows, pad_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[X, 6, 7], [X, 9, X]]


def test_collate_packed_restarts_positions_per_row():
    a, b, c = row([1, 2, 3], [X, 2, 3]), row([4, 5], [X, 5]), row([6, 7, 8, 9], [X, X, 8, 9])
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # no attention mask: positions delimit rows
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["labels"].tolist() == [[X, 2, 3, X, 5], [X, X, 8, 9, X]]
    # padding forms one more block starting at 0, which carries no labels
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]


def test_collate_generation_left_pads_prompts():
    rows = [row([1, 2, 3, 4], [X, X, 3, 4], prompt_len=2, reference="a", meta={"answer": "1"}),
            row([5, 6, 7, 8], [X, X, X, 8], prompt_len=3, reference="b")]
    gen = collate_generation(rows, pad_id=0)
    assert gen["prompt_ids"].tolist() == [[0, 1, 2], [5, 6, 7]]
    assert gen["prompt_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert gen["references"] == ["a", "b"]
    assert gen["meta"] == [{"answer": "1"}, {}]


def test_pack_rows_small_example():
    assert pack_rows([5, 3, 4, 2, 6], max_length=8) == [[4, 3], [0, 1], [2]]


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_fits_and_covers_every_row_once(seed):
    rng = random.Random(seed)
    max_length = 64
    lengths = [rng.randint(1, max_length) for _ in range(300)]
    packs = pack_rows(lengths, max_length)
    assert sorted(i for p in packs for i in p) == list(range(300))
    assert all(sum(lengths[i] for i in p) <= max_length for p in packs)
    # best fit decreasing stays close to the lower bound on the number of sequences
    assert len(packs) <= 1.1 * sum(lengths) / max_length + 2


def test_plan_batches_without_shuffle_is_in_order():
    assert plan_batches([1] * 7, 3, seed=0, epoch=0, shuffle=False, group_by_length=False) == \
        [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_batches([1] * 7, 3, seed=0, epoch=0, shuffle=False, group_by_length=False, drop_last=True) == \
        [[0, 1, 2], [3, 4, 5]]
    # a multiple of the number of ranks
    assert plan_batches([1] * 7, 2, seed=0, epoch=0, shuffle=False, group_by_length=False, world_size=3) == \
        [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="fewer than the 4 ranks"):
        plan_batches([1] * 5, 2, seed=0, epoch=0, shuffle=False, group_by_length=False, world_size=4)


def test_plan_batches_shuffles_per_epoch_deterministically():
    kw = dict(seed=1, shuffle=True, group_by_length=False)
    e0 = plan_batches(list(range(40)), 4, epoch=0, **kw)
    assert e0 == plan_batches(list(range(40)), 4, epoch=0, **kw)
    assert e0 != plan_batches(list(range(40)), 4, epoch=1, **kw)
    assert sorted(i for b in e0 for i in b) == list(range(40))


def test_group_by_length_groups_similar_lengths():
    rng = random.Random(0)
    lengths = [rng.randint(1, 500) for _ in range(256)]
    batches = plan_batches(lengths, 8, seed=0, epoch=0, shuffle=True, group_by_length=True)
    assert sorted(i for b in batches for i in b) == list(range(256))
    # one window (8 x 64 >= 256 rows): each batch is a run of the length-sorted order
    ranked = sorted(range(256), key=lambda i: -lengths[i])
    runs = [sorted(lengths[i] for i in ranked[s: s + 8]) for s in range(0, 256, 8)]
    assert sorted(sorted(lengths[i] for i in b) for b in batches) == sorted(runs)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    plain = plan_batches(lengths, 8, seed=0, epoch=0, shuffle=True, group_by_length=False)
    plain_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in plain)
    assert spread * 10 < plain_spread
    # the batches are shuffled: not simply longest first
    assert [max(lengths[i] for i in b) for b in batches] != sorted((max(r) for r in runs), reverse=True)


def _rows(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 12)
        labels = [X] * rng.randint(1, length - 1)
        labels += [7] * (length - len(labels))
        out.append(row([3] * length, labels))
    return out


@pytest.mark.parametrize("accumulate,world,micro,packed", [(1, 1, 4, False), (2, 1, 3, False), (2, 2, 2, False),
                                                          (3, 2, 1, False), (2, 2, 2, True)])
def test_num_label_tokens_step_counts_the_whole_optimizer_step(accumulate, world, micro, packed):
    rows = _rows(37)
    if packed:
        items = pack_rows([r["length"] for r in rows], 16)
        collate = partial(collate_packed, pad_id=0)
    else:
        items = [[i] for i in range(len(rows))]
        collate = partial(lambda packs, pad_id: collate_rows([p[0] for p in packs], pad_id), pad_id=0)
    per_rank = []
    for rank in range(world):
        ds = PlannedBatches(rows, items, collate, micro, shuffle=True, group_by_length=True, seed=3,
                            accumulate=accumulate, world_size=world, rank=rank)
        per_rank.append(list(ds))
        assert len(ds) == len(per_rank[-1])
    assert len({len(b) for b in per_rank}) == 1
    steps = {}
    for batches in per_rank:  # rank r's i-th micro-batch belongs to optimizer step i // accumulate
        for i, batch in enumerate(batches):
            steps.setdefault(i // accumulate, []).append(batch)
    assert sum(len(m) for m in steps.values()) == sum(len(b) for b in per_rank)
    for step, members in steps.items():
        total = sum(int((b["labels"] != X).sum()) for b in members)
        assert len(members) <= accumulate * world
        assert all(b["num_label_tokens_step"].item() == total for b in members), step
        if not packed:
            assert all(b["num_seqs_step"].item() == sum(m["input_ids"].shape[0] for m in members) for b in members)
    if not packed:  # every row once, but for the micro-batches that do not fill all ranks
        used = sum(b["input_ids"].shape[0] for batches in per_rank for b in batches)
        assert len(rows) - (world - 1) * micro <= used <= len(rows)


def test_num_seqs_step_counts_rows_not_packs():
    rows = _rows(12)
    items = [[0, 1, 2], [3, 4], [5, 6, 7, 8], [9, 10, 11]]
    ds = PlannedBatches(rows, items, partial(collate_packed, pad_id=0), 2, shuffle=False, group_by_length=False,
                        accumulate=2)
    batches = list(ds)
    assert len(batches) == 2
    for b in batches:
        assert b["num_seqs_step"].item() == 12
        assert b["num_label_tokens_step"].item() == sum(r["num_labels"] for r in rows)


def test_resumable_loader_skips_processed_batches_once():
    rows = _rows(10)
    ds = PlannedBatches(rows, [[i] for i in range(10)], lambda packs: collate_rows([p[0] for p in packs], 0), 2,
                        shuffle=True, group_by_length=False, seed=5)
    loader = ResumableLoader(ds)
    full = [b["input_ids"] for b in loader]
    assert len(full) == 5
    loader.load_state_dict({"epoch": 0, "batches_done": 3})
    resumed = [b["input_ids"] for b in loader]
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))
    assert len(list(loader)) == 5  # the next pass is whole again
    assert loader.state_dict() == {"epoch": 0, "batches_done": 0}


def test_resumable_loader_counts_its_own_epochs_across_an_epoch_end_restart():
    """Lightning, resumed from a checkpoint written after an epoch's last batch, counts that epoch
    twice (processed at restart, and again when its empty rest ends): the pass after it is still
    the next epoch's order, and a checkpoint written after an epoch ended points at the next one."""
    rows = _rows(10)

    def loader_at(progress):
        ds = PlannedBatches(rows, [[i] for i in range(10)], lambda packs: collate_rows([p[0] for p in packs], 0), 2,
                            shuffle=True, group_by_length=False, seed=5)
        return ResumableLoader(ds, progress=lambda: progress)

    trainer = [0, 0]  # (epochs processed, batches processed in the epoch) as the trainer counts them
    straight = loader_at(trainer)
    epochs = []
    for count in (0, 1):
        trainer[:] = [count, 0]
        epochs.append([b["input_ids"] for b in straight])
        trainer[1] = 5
        assert straight.state_dict() == {"epoch": count, "batches_done": 5}  # after the last batch
        trainer[0] = count + 1  # the epoch ended (an epoch-end checkpoint)
        assert straight.state_dict() == {"epoch": count + 1, "batches_done": 0}
    assert not all(torch.equal(a, b) for a, b in zip(*epochs))  # two epochs, two orders
    trainer[:] = [0, 5]
    resumed = loader_at(trainer)
    resumed.load_state_dict({"epoch": 0, "batches_done": 5})
    assert list(resumed) == []  # the rest of epoch 0
    trainer[:] = [2, 0]  # Lightning's count after the restart
    again = [b["input_ids"] for b in resumed]
    assert all(torch.equal(a, b) for a, b in zip(again, epochs[1], strict=True))
    assert resumed.state_dict() == {"epoch": 1, "batches_done": 0}


def test_module_train_loader_packs_within_max_length(tmp_path):
    rows = [{"prompt": "x" * (i % 7), "completion": "y" * (1 + i % 3)} for i in range(40)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    total_labels = None
    for packing in (False, True):
        dm = InstructionDataModule(data_files=path, max_length=24, micro_batch_size=4, packing=packing)
        dm.tokenizer = byte_tokenizer()
        dm.setup("fit")
        batches = list(dm.train_dataloader())
        labels = sum(int((b["labels"] != X).sum()) for b in batches)
        assert all(b["input_ids"].shape[1] <= 24 for b in batches)
        assert ("position_ids" in batches[0]) == packing and ("attention_mask" in batches[0]) != packing
        assert total_labels in (None, labels)  # the same label tokens either way (all rows used)
        total_labels = labels
        # one optimizer step per micro-batch here: the step count is the batch's own
        assert all(b["num_label_tokens_step"].item() == int((b["labels"] != X).sum()) for b in batches)
    assert total_labels == sum(r["num_labels"] for r in dm.encoded["train"])


def test_module_eval_loader_carries_generation_inputs(tmp_path):
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    files = {"train": write_jsonl(tmp_path / "t.jsonl", rows), "validation": write_jsonl(tmp_path / "v.jsonl", rows)}
    dm = InstructionDataModule(data_files=files, eval_batch_size=4)
    dm.tokenizer = byte_tokenizer()
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    assert [len(b["references"]) for b in batches] == [4, 1]
    assert batches[0]["references"] == ["1", "2", "3", "4"]
    tok = byte_tokenizer()
    assert tok.batch_decode(batches[0]["prompt_ids"], skip_special_tokens=True) == ["0+1=", "1+1=", "2+1=", "3+1="]
    assert dm.test_dataloader() == []
