"""What the framework decides for the device: the memory estimate behind the micro-batch choice (against
the tensors autograd actually keeps), the micro-batches and compile setting left null, and the CUDA device
of a rank when the launcher binds one GPU to each task."""

import pytest
import torch

from common.errors import UserError
from gpt.config import parse_config
from gpt.distributed import pick_device
from gpt.memory import HEADROOM, GiB, choose_micro_batch, estimate_memory, meta_model
from gpt.model import GPT, GPTConfig, math_attention
from gpt.settings import load_settings
from tests.hydra_compose import compose_train

TOKENS = (16, 128)  # many tokens per weight, so the weights' bf16 copies autograd keeps are negligible


def saved_bytes(model: GPT, dtype: str, math_kernel: bool = False) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward (the activations)."""
    storages = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randint(0, model.config.vocab_size, TOKENS)
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        if math_kernel:
            with math_attention():
                model(x)
        else:
            model(x)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_estimated_activations_per_block_match_what_autograd_keeps(dtype):
    """Per transformer block and token, the estimate's activation bytes are within 15% of the bytes
    autograd keeps (measured as the difference between a 4- and a 2-block model, so the loss and the
    embeddings cancel). With the math attention kernel of the Hutchinson pass, its B·H·T² probabilities
    are within 20% in float32; under bfloat16 the estimate assumes CUDA's fp32 softmax and lies between
    the CPU's measure and twice it. Wrong by a large factor if a tensor class were forgotten or counted
    twice, which would make the chosen micro-batches run out of memory or waste the GPU."""

    def config(layers: int) -> GPTConfig:
        return GPTConfig(n_layer=layers, n_head=4, n_embd=64, block_size=TOKENS[1], vocab_size=256)

    tokens = TOKENS[0] * TOKENS[1]
    torch.manual_seed(0)
    measured = {layers: saved_bytes(GPT(config(layers)), dtype) for layers in (2, 4)}
    per_block = (measured[4] - measured[2]) / 2 / tokens
    estimated = {layers: estimate_memory(meta_model(config(layers)), micro_batch_size=TOKENS[0], dtype=dtype,
                                         state_tensors=2).activations for layers in (2, 4)}
    assert (estimated[4] - estimated[2]) / 2 / tokens == pytest.approx(per_block, rel=0.15)

    math_extra = (saved_bytes(GPT(config(2)), dtype, math_kernel=True) - measured[2]) / 2 / tokens
    two_blocks = meta_model(config(2))
    kinds = {kind: estimate_memory(two_blocks, micro_batch_size=TOKENS[0], dtype=dtype, state_tensors=2,
                                   kind=kind).activations for kind in ("train", "hutchinson")}
    # the Hutchinson estimate doubles its forward for the second graph; per block, it adds the probabilities
    math_per_block = (kinds["hutchinson"] / 2 - kinds["train"]) / 2 / tokens
    if dtype == "float32":
        assert math_per_block == pytest.approx(math_extra, rel=0.2)
    else:
        assert math_extra <= math_per_block <= 2 * math_extra


def test_chosen_micro_batch_is_the_largest_fitting_divisor():
    """gpt2_medium, 480 sequences over 16 GPUs of 40 and 80 GiB: the chosen micro-batch divides the 30
    sequences per rank, fits the memory budget, and the next larger divisor does not fit (or is 30)."""
    model = meta_model(parse_config(compose_train(["model=gpt2_medium", "out_dir=unused"])).model)
    divisors = [m for m in range(1, 31) if 30 % m == 0]
    for memory in (40 * GiB, 80 * GiB):
        chosen = choose_micro_batch(model, per_rank=30, world_size=16, memory=memory, what="test",
                                    dtype="bfloat16", state_tensors=2)
        assert 30 % chosen == 0

        def fits(m: int, memory: int = memory) -> bool:
            return estimate_memory(model, micro_batch_size=m, world_size=16, dtype="bfloat16",
                                   state_tensors=2).total <= HEADROOM * memory

        assert fits(chosen)
        assert all(not fits(m) for m in divisors if m > chosen)


def test_a_model_that_cannot_fit_is_a_user_error():
    """A model that does not fit even one sequence per micro-step: one line naming the remedies, not an
    out-of-memory error deep into the run. gpt2_xl's step on a 16 GiB GPU: activation checkpointing or FSDP;
    its Hutchinson pass on 40 GiB, where checkpointing cannot help (the double backward keeps every
    recomputed block): more memory, or Sophia-G."""
    model = meta_model(parse_config(compose_train(["model=gpt2_xl", "out_dir=unused"])).model)
    with pytest.raises(UserError, match="activation_checkpointing"):
        choose_micro_batch(model, per_rank=60, world_size=8, memory=16 * GiB, what="test",
                           dtype="bfloat16", state_tensors=2)
    with pytest.raises(UserError, match="Sophia-G"):
        choose_micro_batch(model, per_rank=60, world_size=8, memory=40 * GiB, what="test",
                           dtype="bfloat16",
                           state_tensors=2, kind="hutchinson", activation_checkpointing=True)


def test_null_settings_off_cuda(tmp_path):
    """Off CUDA the paper's micro-batch of 12 where it divides the per-rank batch (else the largest divisor
    below it: 10 for 480 over 16 ranks), the curvature pass's the same, compile off and checkpoints written
    in the foreground (a CPU's cores would both train and write)."""
    cfg = compose_train(["optim=sophia_h", f"out_dir={tmp_path}"])
    assert cfg.train.micro_batch_size is None and cfg.train.compile is None
    assert cfg.train.async_checkpoint is None
    for world_size, expected in ((1, 12), (16, 10)):
        settings, _ = load_settings(cfg, world_size=world_size, device=torch.device("cpu"))
        assert settings.train.micro_batch_size == expected
        assert settings.train.hessian_micro_batch_size == expected
        assert settings.train.compile is False and settings.train.async_checkpoint is False


def test_explicit_micro_batches_are_kept(tmp_path):
    """Micro-batches given in the config are used as given (a warning, not a change, if they may not fit)."""
    cfg = compose_train(["optim=sophia_h", f"out_dir={tmp_path}", "train.micro_batch_size=8",
                         "train.hessian_micro_batch_size=2"])
    settings, _ = load_settings(cfg, world_size=1, device=torch.device("cpu"), gpu_memory=80 * GiB)
    assert (settings.train.micro_batch_size, settings.train.hessian_micro_batch_size) == (8, 2)


@pytest.mark.parametrize(("visible", "local_rank", "index"), [(1, 3, 0), (8, 3, 3), (1, 0, 0)])
def test_cuda_device_of_a_rank(monkeypatch, visible, local_rank, index):
    """A rank uses device LOCAL_RANK when it sees all the node's GPUs, and device 0 when Slurm bound one GPU
    to its task (it sees one): set_device(LOCAL_RANK) would fail there with an invalid device ordinal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert pick_device("cuda", local_rank) == torch.device("cuda", index)


def test_more_ranks_than_visible_gpus_is_a_user_error(monkeypatch):
    """Rank 5 of a node where 4 GPUs are visible: one line saying so, not CUDA's invalid device ordinal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(UserError, match="LOCAL_RANK=5"):
        pick_device("cuda", 5)


def test_summed_accumulation_keeps_the_papers_micro_batch(tmp_path):
    """Under protocol=official AdamW sums its micro-steps' losses, so their number sets the effective clip
    and defines the run: a null micro-batch is the paper's 12 on any GPU, not the largest that fits."""
    fair, official = (load_settings(compose_train(["optim=adamw", *protocol, f"out_dir={tmp_path}"]),
                                    world_size=1, device=torch.device("cpu"), gpu_memory=141 * GiB)[0]
                      for protocol in ([], ["protocol=official"]))
    assert official.train.micro_batch_size == 12 and fair.train.micro_batch_size > 12

