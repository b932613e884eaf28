"""Block hashes of token files: recorded at preparation, re-checked on a random sample at every start."""

import hashlib
import random

from data import blocks


def test_block_hashes_are_sha256_of_consecutive_blocks(tmp_path):
    """Wrong if a block is skipped, overlaps the next, or the short last block is dropped."""
    path = tmp_path / "train.bin"
    content = bytes(range(256)) * 41  # 10,496 bytes: 10 whole blocks of 1 KiB and a 256-byte tail
    path.write_bytes(content)
    expected = [hashlib.sha256(content[i : i + 1024]).hexdigest() for i in range(0, len(content), 1024)]
    assert blocks.block_hashes(path, 1024) == expected and len(expected) == 11


def test_a_changed_block_is_found_when_sampled_and_never_reported_otherwise(tmp_path):
    """Wrong if a modified block that is sampled passes, or an untouched file is reported changed."""
    path = tmp_path / "train.bin"
    path.write_bytes(bytes(range(256)) * 40)
    hashes = blocks.block_hashes(path, 1024)
    for seed in range(20):
        assert blocks.sampled_mismatch(path, hashes, 1024, rng=random.Random(seed)) is None
    data = bytearray(path.read_bytes())
    data[7 * 1024 + 3] ^= 1
    path.write_bytes(bytes(data))
    assert "block 7 " in blocks.sampled_mismatch(path, hashes, 1024, sampled=10)  # every block sampled
    found = sum(blocks.sampled_mismatch(path, hashes, 1024, sampled=4, rng=random.Random(seed)) is not None
                for seed in range(200))
    assert 40 < found < 120, found  # block 7 is one of 9 non-first blocks: sampled with probability 4/9
