"""The model families (GPT-2, GPT-NeoX, Llama-style) against independent references: GPT-2 against this
model as it was at commit d654ebf (before the switches), GPT-NeoX and Llama against published parameter
counts, the KV cache against recomputing the window, FLOPs against torch's FLOP counter and activation memory
against what autograd saves. test_families_hf.py checks them against transformers' implementations."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.errors import UserError
from gpt.memory import values_per_block
from gpt.model import FAMILY_FIELDS, GPT, GPTConfig, math_attention, rotary_angles
from gpt.run_identity import identity_differences

REPO = Path(__file__).resolve().parents[2]
BEFORE_FAMILIES = "d654ebf"  # the last commit whose model was GPT-2 only

# Small configs of each family, every switch exercised somewhere; vocabulary 320 = the byte tokenizer padded.
SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=320)
FAMILIES = {
    "gpt2": dict(bias=True, scale_attn_by_inverse_layer_idx=True),
    "gpt2_untied_exact_gelu": dict(tie_embeddings=False, mlp="gelu", mlp_hidden=40, norm_eps=1e-6),
    "neox": dict(positions="rotary", rotary_fraction=0.25, mlp="gelu", block="parallel", bias=True,
                 tie_embeddings=False),
    "neox_sequential_tied_no_bias": dict(positions="rotary", rotary_fraction=0.5, rotary_base=500.0,
                                         mlp="gelu_tanh", mlp_hidden=48, tie_embeddings=True),
    "llama": dict(positions="rotary", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", mlp_hidden=88,
                  tie_embeddings=False, rotary_base=500000.0),
    "llama_bias_tied": dict(positions="rotary", norm="rmsnorm", mlp="swiglu", bias=True),
}


def small(name: str, seed: int = 0, **overrides) -> GPT:
    """A small model of `name`'s family with every parameter random (norms and biases too)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**SMALL, **FAMILIES[name], **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tokens(*shape: int, seed: int = 1, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ GPT-2 bit for bit

@pytest.fixture(scope="module")
def model_before_families() -> ModuleType:
    """gpt/model.py as it was at commit d654ebf, loaded as a module of its own."""
    try:
        source = subprocess.run(["git", "show", f"{BEFORE_FAMILIES}:gpt/model.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"needs the git history (commit {BEFORE_FAMILIES}) to load the earlier model")
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("model_d654ebf", loader=None))
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE_FAMILIES}:gpt/model.py", "exec"), module.__dict__)
    yield module
    del sys.modules[module.__name__]


@pytest.mark.parametrize("options", [{}, dict(bias=True, scale_attn_by_inverse_layer_idx=True, dropout=0.1)],
                         ids=["quickstart_like", "official_biased_dropout"])
def test_gpt2_is_bit_identical_to_the_model_before_the_families(model_before_families, options):
    """Wrong if the GPT-2 path changed anything: parameter names or order, an initialisation draw (a module
    created in another order), or any operation of the forward (losses, dropout masks, generation)."""
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, **options)
    torch.manual_seed(0)
    old = model_before_families.GPT(model_before_families.GPTConfig(**cfg))
    torch.manual_seed(0)
    new = GPT(GPTConfig(**cfg))
    assert [n for n, _ in old.named_parameters()] == [n for n, _ in new.named_parameters()]
    assert list(old.state_dict()) == list(new.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values(),
                                                   strict=True))
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (old, new)]
    for step in range(5):
        x = tokens(4, 16, seed=step, vocab=64)
        losses = []
        for model, optimizer in zip((old, new), optimizers, strict=True):
            torch.manual_seed(100 + step)  # the same dropout masks
            loss = model(x, x)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1], step
    old.eval(), new.eval()
    prompt = tokens(2, 3, vocab=64)
    for kwargs in (dict(temperature=0), dict(temperature=0.8, top_k=5)):
        torch.manual_seed(5)
        before = old.generate(prompt, 13, **kwargs)
        for use_cache in (True, False):
            torch.manual_seed(5)
            assert torch.equal(new.generate(prompt, 13, use_cache=use_cache, **kwargs), before), kwargs


def test_a_run_recorded_before_the_families_resumes_as_gpt2():
    """Wrong if a config.yaml written before the switches existed (no `positions`, `norm`, ...) counted as
    another experiment: its run could not be resumed."""
    model = {k: v for k, v in asdict(GPTConfig(n_layer=4, n_head=4, n_embd=128)).items()
             if k not in FAMILY_FIELDS}
    new = asdict(GPTConfig(n_layer=4, n_head=4, n_embd=128))

    def model_differences(old: dict, now: dict) -> list[str]:
        differences = identity_differences({"model": old}, {"model": now})
        return [line for line in differences if line.startswith("model.")]

    assert model_differences(model, new) == []
    assert model_differences(model, {**new, "norm": "rmsnorm"}) == ["model.norm: 'layernorm' -> 'rmsnorm'"]


# ----------------------------------------------------------------------------- against published counts

# The Pythia suite's model card (EleutherAI, Hugging Face): non-embedding parameters (embed_in and embed_out
# excluded), GPT-NeoX architecture, vocabulary 50304.
PYTHIA_NON_EMBEDDING = {(6, 8, 512): 18_915_328, (12, 12, 768): 85_056_000, (24, 16, 1024): 302_311_424,
                        (24, 16, 2048): 1_208_602_624}


@pytest.mark.parametrize("shape", list(PYTHIA_NON_EMBEDDING))
def test_neox_parameter_counts_match_pythia(shape):
    """Wrong if a NeoX layer, bias or norm were missing or extra (the untied tables are taken off both)."""
    layers, heads, width = shape
    config = GPTConfig(n_layer=layers, n_head=heads, n_embd=width, block_size=2048, positions="rotary",
                       rotary_fraction=0.25, mlp="gelu", block="parallel", bias=True, tie_embeddings=False)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() - 2 * 50304 * width == PYTHIA_NON_EMBEDDING[shape]


def test_llama_parameter_count_matches_llama_2_7b():
    """Llama 2 7B (Touvron et al. 2023): 6,738,415,616 parameters with a 32,000 vocabulary, untied."""
    config = GPTConfig(n_layer=32, n_head=32, n_embd=4096, block_size=4096, vocab_size=32000,
                       positions="rotary", norm="rmsnorm", mlp="swiglu", mlp_hidden=11008,
                       tie_embeddings=False)
    with torch.device("meta"):
        assert GPT(config).num_params() == 6_738_415_616


# ----------------------------------------------------------------------------------- generation, cached

@pytest.mark.parametrize("name", FAMILIES)
def test_cached_greedy_decoding_equals_recomputing_the_window(name):
    """Wrong if a cached key or value, a rotary position after the prompt, or the window's shift once the
    context is full (35 tokens on a 16-token model: shifts by 4 at 17, 21, ...) differ between the paths."""
    model = small(name)
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 35, temperature=0)
    assert torch.equal(cached, model.generate(prompt, 35, temperature=0, use_cache=False))
    long_prompt = tokens(2, 20)  # longer than the context: cropped to its last 16 tokens, as before
    assert torch.equal(model.generate(long_prompt, 10, temperature=0),
                       model.generate(long_prompt, 10, temperature=0, use_cache=False))


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", FAMILIES)
def test_one_token_decoder_gives_the_forward_passs_logits(name, dtype, tolerance):
    """Wrong if the lean one-token forward (gpt/decode.py) leaves out or reorders anything the module forward
    does: a bias, a norm's kind or eps, rotary positions, the parallel block, SwiGLU's gate, the score scale
    or the cache's positions. The reference is a plain forward over the whole sequence, no cache."""
    from gpt.decode import Decoder
    from gpt.model import KVCache

    model = small(name).to(dtype)
    seq = tokens(2, 4)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    with torch.no_grad():
        model(seq, cache=cache)
        decoder = Decoder(model)
        for _ in range(model.config.block_size - seq.shape[1]):
            seq = torch.cat([seq, tokens(2, 1, seed=seq.shape[1])], dim=1)
            step = decoder.step(seq[:, -1:], cache)
            torch.testing.assert_close(step, model(seq)[0][:, -1], rtol=tolerance, atol=tolerance)
    assert cache.length == model.config.block_size


def test_generate_in_training_mode_with_dropout_decodes_through_the_modules():
    """The lean decoder has no dropout: in training mode with dropout the modules decode every token (a hook
    on the first block sees one-token forwards); in eval mode only the window's first forward reaches them."""
    model = small("gpt2", dropout=0.5)
    lengths = []
    model.transformer.h[0].register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))
    model.generate(tokens(1, 3), 6, temperature=0)
    assert lengths == [3]
    model.train().generate(tokens(1, 3), 6, temperature=0)
    assert lengths[1:] == [3, 1, 1, 1, 1, 1]


def test_top_p_keeps_the_smallest_set_reaching_p():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two (0.8 ≥ 0.7), drawn 5:3."""
    from gpt.sampling import next_tokens

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(40000, -1)
    torch.manual_seed(0)
    drawn = next_tokens(logits, 1.0, None, 0.7)[:, 0]
    assert set(drawn.tolist()) == {1, 3}
    assert (drawn == 1).float().mean().item() == pytest.approx(0.625, abs=0.01)
    assert set(next_tokens(logits[:100], 1.0, None, 0.5)[:, 0].tolist()) == {1}


def test_stop_id_pads_finished_rows_and_ends_early():
    """A row that produced the stop token repeats it while another row goes on; decoding ends once every row
    has produced it (here: when the first row's third new token is the stop token, and the second row,
    given the first row's prompt and tokens, stops at the same step)."""
    model = small("gpt2")
    free = model.generate(tokens(1, 3), 30, temperature=0)
    stop = int(free[0, 5])
    first = int((free[0, 3:] == stop).nonzero()[0])  # the first new token equal to it (at most the third)
    both = torch.cat([free[:, :3], tokens(1, 3, seed=7)])
    out = model.generate(both, 30, temperature=0, stop_id=stop)
    assert torch.equal(out[0, :3 + first + 1], free[0, :3 + first + 1])
    assert (out[0, 3 + first:] == stop).all()
    other = model.generate(both[1:], 30, temperature=0)[0, 3:]
    hits = (other == stop).nonzero()
    end = int(hits[0]) + 1 if len(hits) else 30
    assert out.shape[1] == 3 + max(first + 1, end)


# ----------------------------------------------------------------------------- FLOPs, memory, the switches

@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied_exact_gelu", "neox", "llama"])
def test_flops_per_token_match_torchs_flop_counter(name):
    """6N + 12·L·d·T against the matmul FLOPs torch counts in one forward and backward (through the math
    attention kernel, so QKᵀ and AV are plain matmuls): wrong if SwiGLU's third matrix, an untied head or
    an input table were counted wrongly. The counter counts matmuls only, so the 6 FLOPs per vector
    parameter (norms, biases) that 6N includes are taken off; then the two agree exactly."""
    model = small(name, block_size=64).train()
    idx = tokens(2, 64)
    counter = FlopCounterMode(display=False)
    with math_attention(), counter:
        model(idx, idx)[1].backward()
    vectors = sum(p.numel() for p in model.parameters() if p.ndim == 1)
    assert model.flops_per_token(64) - 6 * vectors == counter.get_total_flops() / idx.numel()


def saved_per_token(model: GPT) -> float:
    """Bytes autograd keeps for the first block's backward, per token and per n_embd, in float32 (weights
    not counted; 8 sequences of 64 tokens, so rotary's cos and sin tables add under 0.2)."""
    config, block = model.config, model.transformer.h[0]
    x = torch.randn(8, 64, config.n_embd, requires_grad=True)
    rope = rotary_angles(config, torch.arange(64)) if config.positions == "rotary" else None
    kept = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        block(x, rope)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    return sum(size for pointer, size in kept.items() if pointer not in params) / (x.numel() * 4)


@pytest.mark.parametrize("name", ["gpt2_untied_exact_gelu", "neox", "neox_sequential_tied_no_bias", "llama",
                                  "llama_bias_tied"])
def test_activation_values_beyond_gpt2s_match_what_autograd_saves(name):
    """values_per_block's difference from GPT-2's at the same width against the difference in what autograd
    saves: wrong if the MLP's width, SwiGLU's, rotary's or RMSNorm's extra activations, or the parallel
    block's shared input were miscounted. (GPT-2's own count is the memory module's calibrated constant.)"""
    model = small(name, n_embd=64, block_size=64).train()
    gpt2 = small("gpt2", n_embd=64, block_size=64).train()
    expected = sum(values_per_block(model.config)) - sum(values_per_block(gpt2.config))
    assert saved_per_token(model) - saved_per_token(gpt2) == pytest.approx(expected, abs=0.3)


@pytest.mark.parametrize("bad, message", [
    (dict(positions="alibi"), "model.positions='alibi' is not one of learned, rotary"),
    (dict(norm="batchnorm"), "model.norm"), (dict(mlp="relu"), "model.mlp"),
    (dict(block="tree"), "model.block"),
    (dict(positions="rotary", rotary_fraction=0.1), "rotates 1 of each head's 16 dimensions"),
    (dict(rotary_fraction=0.0), "rotary_fraction=0.0"), (dict(mlp_hidden=0), "mlp_hidden"),
    (dict(norm_eps=0.0), "norm_eps"),
])
def test_bad_switches_are_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**SMALL, **bad)


def test_the_plan_names_the_switches(tmp_path, capsys):
    """The plan says which family it builds (a Llama-style run must not look like GPT-2's)."""
    from gpt.distributed import init_runtime
    from gpt.settings import load_settings
    from gpt.trainer import Trainer
    from tests.hydra_compose import compose_train

    cfg = compose_train(["train.dry_run=true", f"out_dir={tmp_path}", "train.device=cpu", "model=llama_125m"])
    settings, plan = load_settings(cfg)
    Trainer(settings, init_runtime("single", "cpu"), plan).run()
    out = capsys.readouterr().out
    assert "model: rotary positions (100% of each head, base 10000), RMSNorm, SwiGLU MLP 2048 wide" in out
    assert "untied head" in out and "(162.22 M parameters)" in out


def test_model_settings_round_trip_through_a_checkpoint_config(tmp_path):
    """A run's recorded model section rebuilds the same model (the evaluation scripts' path)."""
    from gpt.eval.pretrained import gpt_config

    config = replace(small("llama").config, dropout=0.1)
    assert gpt_config({"name": "x", **asdict(config)}) == config


@pytest.mark.parametrize("name", ["neox", "llama"])
def test_activation_checkpointing_and_bf16_autocast_run_every_family(name):
    """Wrong if a block's extra inputs (rotary angles) were lost by checkpointing's recomputation (the
    gradients would differ), or rotary mixed dtypes under autocast (SDPA refuses q and k in float32 with v
    in bfloat16)."""
    from gpt.distributed import checkpoint_activations

    idx = tokens(2, 16)
    plain, checkpointed = small(name).train(), small(name).train()
    checkpoint_activations(checkpointed)
    for model in (plain, checkpointed):
        model(idx, idx)[1].backward()
    for (key, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=key)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = plain(idx, idx)[1]
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(plain(idx, idx)[1].item(), rel=0.05)
