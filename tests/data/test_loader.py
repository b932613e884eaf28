"""Batch loader: token files are checked against meta.json; every batch is a pure function of its index."""

import json
import re

import numpy as np
import pytest
import torch

from common.errors import UserError
from data.loader import BatchLayout, BatchLoader, TokenData

T = 8  # block_size


@pytest.fixture
def data_dir(tmp_path):
    """Hand-written files (independent of data.prepare): token i of train is i, of val 30000 + i, so a
    window's first token is its offset."""
    splits = {"train": np.arange(5000, dtype="<u2"), "val": np.arange(30000, 31000, dtype="<u2")}
    for name, tokens in splits.items():
        tokens.tofile(tmp_path / f"{name}.bin")
    meta = {
        "format_version": 1,
        "tokenizer": "byte",
        "vocab_size": 256,
        "eot_id": 0,
        "dtype": "uint16",
        "splits": {name: {"tokens": len(tokens), "documents": 1} for name, tokens in splits.items()},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    return tmp_path


def loader(data_dir, *, global_batch_size=8, micro_batch_size=2, world_size=1, rank=0, seed=0,
           vocab_limit=None):
    plan = BatchLayout(global_batch_size, micro_batch_size, T, world_size)
    return BatchLoader(TokenData(data_dir), plan, rank=rank, seed=seed, vocab_limit=vocab_limit)


def test_truncated_token_file_is_refused(data_dir):
    """Otherwise training would silently read a half-copied or half-written dataset."""
    with open(data_dir / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(
        UserError, match=re.escape("has 1000 bytes but meta.json promises 5000 tokens = 10000 bytes")
    ):
        TokenData(data_dir)


def test_missing_folder_says_how_to_prepare(tmp_path):
    """Otherwise a user with no prepared data gets a FileNotFoundError instead of the command to run."""
    with pytest.raises(UserError, match=r"python -m data\.prepare data=<name>"):
        TokenData(tmp_path / "nothing")


def test_tokenizer_or_vocab_mismatch_is_refused(data_dir):
    """Otherwise a model would train on ids from another tokenizer than the one it is built for."""
    with pytest.raises(UserError, match="tokenizer 'byte' but 'gpt2' is expected"):
        TokenData(data_dir, tokenizer="gpt2")
    with pytest.raises(UserError, match="vocab_size 256 but 50257 is expected"):
        TokenData(data_dir, vocab_size=50257)
    data = TokenData(data_dir, tokenizer="byte", vocab_size=256)
    assert (data.tokenizer, data.vocab_size, data.eot_id) == ("byte", 256, 0)


def test_batch_follows_the_documented_formula(data_dir):
    """Otherwise a batch is not the pure function of (seed, step) that exact resume and fair comparison need:
    offsets are default_rng([seed, 0, step]) over [0, len - T - 1], rank r at micro-step k takes the rows
    (k * world_size + r) * micro_batch_size onwards, and y is x shifted by one token."""
    offsets = np.random.default_rng([5, 0, 3]).integers(0, 5000 - T, size=8)
    x, y = loader(data_dir, seed=5, world_size=2, rank=1).train_batch(step=3, micro_step=1)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, T)
    expected_x = offsets[(1 * 2 + 1) * 2 :][:2, None] + np.arange(T)
    assert torch.equal(x, torch.from_numpy(expected_x)) and torch.equal(y, x + 1)


def test_same_arguments_give_same_batches(data_dir):
    """Otherwise resuming a run would not replay the same data."""
    a, b = loader(data_dir), loader(data_dir)
    for step, micro_step in [(0, 0), (7, 3), (100_000, 1)]:
        assert all(
            torch.equal(u, v)
            for u, v in zip(a.train_batch(step, micro_step), b.train_batch(step, micro_step), strict=True)
        )


def test_ranks_micro_steps_and_steps_see_different_sequences(data_dir):
    """Otherwise ranks would duplicate each other's work, or training would repeat one batch."""
    x0, _ = loader(data_dir, world_size=2, rank=0).train_batch(0, 0)
    x1, _ = loader(data_dir, world_size=2, rank=1).train_batch(0, 0)
    assert not torch.equal(x0, x1)
    single = loader(data_dir)
    assert not torch.equal(single.train_batch(0, 0)[0], single.train_batch(0, 1)[0])
    assert not torch.equal(single.train_batch(0, 0)[0], single.train_batch(1, 0)[0])


def test_two_ranks_see_the_global_batch_of_one_process(data_dir):
    """Otherwise a DDP run would not train on the same sequences as the single-process run it must match."""
    single = loader(data_dir, global_batch_size=8, micro_batch_size=2)
    one_process = torch.cat([single.train_batch(5, k)[0] for k in range(4)])
    ranks = [
        loader(data_dir, global_batch_size=8, micro_batch_size=2, world_size=2, rank=r) for r in range(2)
    ]
    two_ranks = torch.cat([ranks[r].train_batch(5, k)[0] for k in range(2) for r in range(2)])
    assert torch.equal(one_process, two_ranks)
    big_micro = loader(data_dir, global_batch_size=8, micro_batch_size=4)
    assert torch.equal(torch.cat([big_micro.train_batch(5, k)[0] for k in range(2)]), one_process)


def test_hessian_stream_differs_from_training_and_has_its_own_size(data_dir):
    """Otherwise Sophia's curvature would be estimated on the very sequences of the training step."""
    batches = loader(data_dir)
    assert not torch.equal(batches.hessian_batch(3, 0)[0], batches.train_batch(3, 0)[0])
    assert batches.hessian_batch(3, 1, global_batch_size=4)[0].shape == (2, T)
    assert batches.hessian_batch(3, 0, global_batch_size=4, micro_batch_size=4)[0].shape == (4, T)


def test_validation_batches_are_fixed_and_from_the_val_split(data_dir):
    """Otherwise runs with different seeds would be evaluated on different data, or on training tokens."""
    a, b = loader(data_dir, seed=1), loader(data_dir, seed=2, micro_batch_size=4)
    assert torch.equal(a.val_batch(0, 2)[0], b.val_batch(0, 4)[0][:2]) and torch.equal(
        a.val_batch(2, 2)[0], b.val_batch(0, 4)[0][2:]
    )
    assert not torch.equal(a.val_batch(0, 2)[0], a.val_batch(2, 2)[0])
    x, y = a.val_batch(6, 2)
    assert x.min() >= 30000 and x.max() + 1 < 31000 and torch.equal(y, x + 1)


@pytest.mark.parametrize("sequences", [1, 7, 12])
def test_validation_set_is_the_same_sequences_whatever_the_batch_layout(data_dir, sequences):
    """Otherwise a run resumed with another micro-batch size or number of ranks (as resharding needs) would
    be evaluated on another set: every layout must cover sequences 0 … N−1 once each with weight 1 per
    sequence, and give every rank the same number of forwards (a rank past the end gets weight 0)."""
    for micro_batch_size, world_size in [(1, 1), (2, 1), (4, 1), (8, 1), (2, 2), (4, 2), (2, 4)]:
        weights: dict[int, float] = {}
        rounds = set()
        for rank in range(world_size):
            batches = loader(data_dir, micro_batch_size=micro_batch_size, world_size=world_size,
                             rank=rank).val_schedule(sequences)
            rounds.add(len(batches))
            for first, count, weight in batches:
                assert weight in (0.0, count) and 1 <= count <= micro_batch_size
                if weight:
                    for j in range(first, first + count):
                        weights[j] = weights.get(j, 0.0) + weight / count
        assert weights == dict.fromkeys(range(sequences), 1.0), (micro_batch_size, world_size)
        assert len(rounds) == 1, "ranks would run different numbers of forwards"


def sampled_offsets(batches: BatchLoader, step: int, count: int = 200) -> np.ndarray:
    """The offsets of the windows the official estimate draws after `step` steps (a window's first token
    is 30000 + its offset in the val split)."""
    rows = [batches.sampled_val_batch(step, index, count) for index in range(count)]
    for x, y in rows:
        assert torch.equal(y, x + 1)
    return torch.cat([x[:, 0] for x, _ in rows]).numpy() - 30000


def test_official_estimate_draws_fresh_windows_that_a_resume_repeats(data_dir):
    """The official scripts draw 200 micro-batches of new random windows at every evaluation. Wrong if two
    evaluations see the same windows, if the windows are the fixed set's, if a new loader (a resumed process)
    draws other windows for the same step, or if the draw ignores the seed like the fixed set does."""
    batches = loader(data_dir, seed=5)
    first, later = sampled_offsets(batches, 10), sampled_offsets(batches, 20)
    assert first.shape == (400,)  # 200 batches × micro-batch 2
    assert np.mean(first == later) < 0.05  # fresh: independent draws of 992 offsets agree ~0.1% of the time
    fixed = batches.val_batch(0, 400)[0][:, 0].numpy() - 30000
    assert np.mean(first == fixed) < 0.05
    assert np.array_equal(sampled_offsets(loader(data_dir, seed=5), 10), first)  # a resumed process
    assert np.mean(sampled_offsets(loader(data_dir, seed=6), 10) == first) < 0.05
    # the draw is per evaluation, not per micro-batch size's prefix only: batch i is rows 2i, 2i + 1
    assert np.array_equal(batches.sampled_val_batch(10, 7, 200)[0][:, 0].numpy() - 30000, first[14:16])


def test_official_estimate_draws_uniform_start_positions_over_the_whole_split(data_dir):
    """The official `get_batch` draws offsets uniformly from [0, len(val) − block_size): here 992 of them.
    Pooled over 50 evaluations (20,000 windows) the offsets must reach both ends and pass a χ² test of
    uniformity over 31 bins of 32 offsets (χ² with 30 degrees of freedom: 59.7 at p = 0.001). Wrong if the
    draw is confined to part of the split (the fixed set's first windows, a prefix) or skewed."""
    batches = loader(data_dir, seed=0)
    pooled = np.concatenate([sampled_offsets(batches, step) for step in range(0, 500, 10)])
    assert pooled.min() == 0 and pooled.max() == 1000 - T - 1
    counts = np.bincount(pooled // 32, minlength=31)
    expected = len(pooled) / 31
    assert ((counts - expected) ** 2 / expected).sum() < 59.7, counts


@pytest.mark.parametrize("count", [1, 7, 200])
def test_every_batch_counts_once_over_the_ranks(data_dir, count):
    """The official estimate's batches shared over ranks: each of the `count` batches counted on exactly one
    rank, every rank running the same number of forwards (padding repeats a batch, not counted). Wrong if a
    batch is lost or counted twice, which would change the number of sequences evaluated."""
    for world_size in (1, 2, 3, 4):
        shares = [loader(data_dir, world_size=world_size, global_batch_size=24, rank=rank).rank_share(count)
                  for rank in range(world_size)]
        counted = sorted(index for share in shares for index, counts in share if counts)
        assert counted == list(range(count)), world_size
        assert len({len(share) for share in shares}) == 1
        assert all(0 <= index < count for share in shares for index, _ in share)


def test_token_ids_beyond_the_model_vocabulary_are_one_clear_error(data_dir):
    """Otherwise a damaged token file crashes training with an IndexError deep inside the embedding."""
    batches = loader(data_dir, vocab_limit=31000)
    batches.val_batch(0, 2)
    with pytest.raises(UserError, match=r"val.bin holds token id 3\d+ >= the model's vocabulary of 30500"):
        loader(data_dir, vocab_limit=30500).val_batch(0, 1000 - T - 1)


def test_whole_split_fits_exactly_one_window(tmp_path, data_dir):
    """Otherwise offsets would read past the end of a split, or refuse a split that just fits."""
    data = TokenData(data_dir)
    assert torch.equal(
        BatchLoader(data, BatchLayout(2, 2, block_size=999), seed=0).val_batch(0, 1)[0][0],
        torch.arange(30000, 30999),
    )
    with pytest.raises(UserError, match="fewer than block_size \\+ 1 = 1001"):
        BatchLoader(data, BatchLayout(2, 2, block_size=1000), seed=0)


def test_a_layout_that_does_not_divide_is_a_bug(data_dir):
    """The trainer's batch plan refuses such sizes with the config's names (tests/gpt/test_settings.py); a
    layout that reaches the loader anyway must fail loudly rather than train on part of the batch."""
    with pytest.raises(ValueError, match="micro_step 0 of 10 sequences"):
        loader(data_dir, global_batch_size=10, micro_batch_size=3).train_batch(0, 0)
    with pytest.raises(ValueError, match="micro_step 4"):
        loader(data_dir, global_batch_size=8, micro_batch_size=2).train_batch(0, 4)
