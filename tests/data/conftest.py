import datasets
import pytest


@pytest.fixture(autouse=True)
def no_download_count(monkeypatch):
    # `datasets` pings the Hub to count loads of its json/csv/parquet builders; offline that
    # waits for a timeout (5 s) although only local files are read here
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
