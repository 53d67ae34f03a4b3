import sys

from lit_align.ablate.cli import entry

sys.exit(entry())
