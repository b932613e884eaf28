"""How every optimizer groups the layers of the GPT-NeoX and Llama-style families: the weight-decay rule on
SwiGLU's gate and an untied head, Muon's hidden matrices (SwiGLU's three, never the head), Adam-mini's blocks,
SOAP's rotated sides; every parameter in exactly one group; and each registry entry's `grouping` line shown
in docs/models.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt.model import GPT, GPTConfig
from optim import OPTIMIZERS, build_optimizer
from optim.adam_mini import second_moment_blocks
from optim.muon import hidden_matrix_names, row_blocks
from optim.registry import param_groups
from optim.soap import preconditioned_sides
from tests.optim.test_contract import CONFIGS

ROOT = Path(__file__).resolve().parents[2]
NEOX = dict(positions="rotary", rotary_fraction=0.5, mlp="gelu", block="parallel", bias=True,
            tie_embeddings=False)
LLAMA = dict(positions="rotary", norm="rmsnorm", mlp="swiglu", mlp_hidden=40, tie_embeddings=False)
FAMILIES = {"neox": NEOX, "llama": LLAMA}


def family(name: str) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32, **FAMILIES[name]))


def block_matrices(model: GPT) -> set[str]:
    """The blocks' Linear weights, named from the architecture (not from any optimizer's rule)."""
    mlp = ["mlp.c_fc", "mlp.c_proj"] + (["mlp.c_gate"] if model.config.mlp == "swiglu" else [])
    return {f"transformer.h.{i}.{layer}.weight" for i in range(model.config.n_layer)
            for layer in ["attn.c_attn", "attn.c_proj", *mlp]}


@pytest.mark.parametrize("name", FAMILIES)
def test_decay_rule_takes_the_blocks_matrices_and_an_untied_head(name):
    """Wrong if SwiGLU's gate escaped weight decay, an RMSNorm gain or a bias decayed, or the untied head
    (an nn.Linear, as in nanoGPT's rule) were treated like the tied embedding."""
    model = family(name)
    decay, no_decay = param_groups(model, 0.1)
    assert {n for n, _ in decay["params"]} == block_matrices(model) | {"lm_head.weight"}
    assert "transformer.wte.weight" in {n for n, _ in no_decay["params"]}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("optimizer", CONFIGS)
def test_every_optimizer_groups_every_parameter_once(name, optimizer):
    """Wrong if a new layer (SwiGLU's gate, an untied head, RMSNorm gains) were left out of the optimizer or
    put in two groups, or a decayed group held anything the decay rule does not decay."""
    model = family(name)
    built = build_optimizer(CONFIGS[optimizer], model, tokens_per_step=16)
    grouped = [id(p) for group in built.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())
    decayed = {id(p) for _, p in param_groups(model, 1.0)[0]["params"]}
    for group in built.param_groups:
        if group.get("weight_decay", 0) and not group.get("use_muon"):
            assert {id(p) for p in group["params"]} <= decayed


@pytest.mark.parametrize("name", FAMILIES)
def test_muon_orthogonalises_the_blocks_matrices_and_leaves_the_head_to_adamw(name):
    """Muon's hidden matrices are exactly the blocks' Linear weights, SwiGLU's three each its own matrix and
    c_attn as its q, k and v blocks; wrong if the untied output head went to Muon."""
    model = family(name)
    assert hidden_matrix_names(model) == block_matrices(model)
    built = build_optimizer(CONFIGS["muon"], model, tokens_per_step=16)
    muon = {id(p) for group in built.param_groups if group["use_muon"] for p in group["params"]}
    assert id(model.lm_head.weight) not in muon and id(model.transformer.h[0].mlp.c_fc.weight) in muon
    attn = model.transformer.h[0].attn.c_attn.weight
    assert len(row_blocks("transformer.h.0.attn.c_attn.weight", attn)) == 3


def test_adam_mini_blocks_of_the_llama_layers():
    """One second moment per head of q and k, per row of v and of every other matrix (SwiGLU's gate among
    them, and the untied head: one per token), one per norm gain."""
    model = family("llama")
    counts = {n: sum(h // r for h, r in second_moment_blocks(n, p.shape, n_head=2))
              for n, p in model.named_parameters()}
    assert counts["transformer.h.0.attn.c_attn.weight"] == 2 + 2 + 16
    assert counts["transformer.h.0.mlp.c_gate.weight"] == 40
    assert counts["lm_head.weight"] == 32
    assert counts["transformer.h.0.ln_1.weight"] == 1


def test_soap_rotates_every_matrix_side_but_the_vocabulary():
    """Llama-style 768-wide shapes: both sides of SwiGLU's matrices rotated; the head's and the embedding's
    50,304-long vocabulary side not (max_precond_dim 10,000); norm gains not at all."""
    config = GPTConfig(n_layer=1, n_head=12, n_embd=768, **LLAMA)
    with torch.device("meta"):
        model = GPT(config)
    sides = {n: preconditioned_sides(p.shape, 10000) for n, p in model.named_parameters()}
    assert sides["transformer.h.0.mlp.c_gate.weight"] == [0, 1]
    assert sides["lm_head.weight"] == sides["transformer.wte.weight"] == [1]
    assert sides["transformer.h.0.ln_1.weight"] == []


def test_every_entry_says_how_it_groups_and_the_docs_show_it():
    """Wrong if an optimizer were registered without its grouping line, or docs/models.md did not list it."""
    docs = (ROOT / "docs" / "models.md").read_text()
    for name, entry in OPTIMIZERS.items():
        assert entry.grouping.strip(), name
        assert f"| `{name}` | {entry.grouping} |" in docs, name
