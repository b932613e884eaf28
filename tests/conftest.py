"""Test setup shared by all packages: GPT-2's BPE ranks come from the shared offline tiktoken cache."""

import os
from pathlib import Path

os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "tiktoken"))
