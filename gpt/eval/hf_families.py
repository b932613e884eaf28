"""The three Hugging Face architectures this project's GPT converts to and from, tensor by tensor.

`GPT2LMHeadModel` takes learned positions, LayerNorm, a GELU MLP and sequential blocks; `GPTNeoXForCausalLM`
rotary positions (any fraction of each head), LayerNorm, a GELU MLP and either block; `LlamaForCausalLM`
rotary positions on whole heads, RMSNorm, SwiGLU and sequential blocks. Any of them may be tied or untied;
only GPT-2 has the official Sophia runs' per-layer attention scaling. A config that fits none is refused in
one line naming what does not fit.

Each architecture is a list of rules, one per tensor of this project's state dict: the Hugging Face
tensor(s) it becomes and back. GPT-2's `Conv1D` stores (in, out), the transpose of `nn.Linear`. NeoX's fused
`query_key_value` groups rows by head ([q, k, v] of head 0, then head 1, ...) where `c_attn` stacks all
heads' q, then k, then v. Llama keeps q, k and v as three matrices. Biases: GPT-2 has them everywhere and
NeoX in its LayerNorms and MLP whatever `attention_bias` says, so a bias-free model exports zeros there;
importing refuses nonzero biases into a bias-free model. The vocabulary rows beyond the tokenizer's are cut
on export and padded back with the mean row on import (gpt/eval/hf.py says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from common.errors import UserError
from gpt.model import GPTConfig

GELU_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu"}  # this project's mlp -> Hugging Face's activation
GELU_FROM_HF = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
RENAMED_IN_5X = {"embed_out.weight": "lm_head.weight"}  # a name transformers 4.x saves -> 5.x's in memory


@dataclass(frozen=True)
class Rule:
    """One tensor of this project's state dict and the Hugging Face tensors it is."""

    ours: str
    theirs: tuple[str, ...]
    export: Callable[[Tensor], tuple[Tensor, ...]] = lambda t: (t,)
    load: Callable[..., Tensor] = lambda t: t
    always: bool = False  # a bias Hugging Face's model has even when this model has none (exported as 0)
    vocab: bool = False  # rows per token: cut to the tokenizer's vocabulary, padded back on import


def transposed(name: str) -> Rule:
    """A GPT-2 Conv1D weight, whose bias Hugging Face's model always has."""
    return Rule(name, (name,), lambda t: (t.t(),), lambda t: t.t(), always=True)


def renamed(name: str, theirs: str, always: bool = False, vocab: bool = False) -> Rule:
    return Rule(name, (theirs,), always=always, vocab=vocab)


def by_head(config: GPTConfig) -> tuple[Callable, Callable]:
    """c_attn's rows [q | k | v] (each all heads) to NeoX's [q, k, v per head] and back (weight or bias)."""
    shape = (3, config.n_head, config.head_dim)

    def export(t: Tensor) -> tuple[Tensor]:
        return (t.reshape(*shape, -1).transpose(0, 1).reshape(t.shape),)

    def load(t: Tensor) -> Tensor:
        return t.reshape(shape[1], 3, shape[2], -1).transpose(0, 1).reshape(t.shape)

    return export, load


def split_qkv(t: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.chunk(3, dim=0))


def join_qkv(*parts: Tensor) -> Tensor:
    return torch.cat(parts, dim=0)


def with_biases(config: GPTConfig, weights: list[Rule]) -> list[Rule]:
    """Each weight's rule followed by its bias's: the same names ending in .bias, the same transform and
    `always` (an RMSNorm has no bias)."""
    rules = []
    for rule in weights:
        rules.append(rule)
        if config.norm == "layernorm" or ".ln_" not in rule.ours:
            rules.append(replace(rule, ours=rule.ours.replace(".weight", ".bias"),
                                 theirs=tuple(name.replace(".weight", ".bias") for name in rule.theirs)))
    return rules


def gpt2_rules(config: GPTConfig) -> list[Rule]:
    rules = [renamed("transformer.wte.weight", "transformer.wte.weight", vocab=True),
             renamed("transformer.wpe.weight", "transformer.wpe.weight")]
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        rules += with_biases(config, [
            renamed(p + "ln_1.weight", p + "ln_1.weight", always=True), transposed(p + "attn.c_attn.weight"),
            transposed(p + "attn.c_proj.weight"), renamed(p + "ln_2.weight", p + "ln_2.weight", always=True),
            transposed(p + "mlp.c_fc.weight"), transposed(p + "mlp.c_proj.weight")])
    rules += with_biases(config, [renamed("transformer.ln_f.weight", "transformer.ln_f.weight", always=True)])
    return rules + _head(config, "lm_head.weight")


def neox_rules(config: GPTConfig) -> list[Rule]:
    export, load = by_head(config)
    rules = [renamed("transformer.wte.weight", "gpt_neox.embed_in.weight", vocab=True)]
    for i in range(config.n_layer):
        p, q = f"transformer.h.{i}.", f"gpt_neox.layers.{i}."
        rules += with_biases(config, [
            renamed(p + "ln_1.weight", q + "input_layernorm.weight", always=True),
            Rule(p + "attn.c_attn.weight", (q + "attention.query_key_value.weight",), export, load),
            renamed(p + "attn.c_proj.weight", q + "attention.dense.weight"),
            renamed(p + "ln_2.weight", q + "post_attention_layernorm.weight", always=True),
            renamed(p + "mlp.c_fc.weight", q + "mlp.dense_h_to_4h.weight", always=True),
            renamed(p + "mlp.c_proj.weight", q + "mlp.dense_4h_to_h.weight", always=True)])
    rules += with_biases(config, [renamed("transformer.ln_f.weight", "gpt_neox.final_layer_norm.weight",
                                          always=True)])
    # transformers 4.x names NeoX's head embed_out (5.x reads that name too)
    return rules + _head(config, "embed_out.weight")


def llama_rules(config: GPTConfig) -> list[Rule]:
    rules = [renamed("transformer.wte.weight", "model.embed_tokens.weight", vocab=True)]
    for i in range(config.n_layer):
        p, q = f"transformer.h.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{q}self_attn.{x}_proj.weight" for x in "qkv")
        rules += with_biases(config, [
            renamed(p + "ln_1.weight", q + "input_layernorm.weight"),
            Rule(p + "attn.c_attn.weight", qkv, split_qkv, join_qkv),
            renamed(p + "attn.c_proj.weight", q + "self_attn.o_proj.weight"),
            renamed(p + "ln_2.weight", q + "post_attention_layernorm.weight"),
            renamed(p + "mlp.c_gate.weight", q + "mlp.gate_proj.weight"),
            renamed(p + "mlp.c_fc.weight", q + "mlp.up_proj.weight"),
            renamed(p + "mlp.c_proj.weight", q + "mlp.down_proj.weight")])
    rules.append(renamed("transformer.ln_f.weight", "model.norm.weight"))
    return rules + _head(config, "lm_head.weight")


def _head(config: GPTConfig, theirs: str) -> list[Rule]:
    return [] if config.tie_embeddings else [renamed("lm_head.weight", theirs, vocab=True)]


# ------------------------------------------------------------------------------------------ the configs

def gpt2_config(config: GPTConfig) -> dict[str, Any]:
    return {"n_positions": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
            "n_head": config.n_head, "n_inner": config.mlp_hidden,
            "activation_function": GELU_NAMES[config.mlp],
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "layer_norm_epsilon": config.norm_eps, "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": config.tie_embeddings}


def neox_config(config: GPTConfig) -> dict[str, Any]:
    # rotary_pct and rotary_emb_base: the names transformers 4.x reads, and 5.x converts
    return {"hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "intermediate_size": config.hidden_width,
            "hidden_act": GELU_NAMES[config.mlp], "rotary_pct": config.rotary_fraction,
            "rotary_emb_base": config.rotary_base, "max_position_embeddings": config.block_size,
            "layer_norm_eps": config.norm_eps, "use_parallel_residual": config.block == "parallel",
            "attention_bias": config.bias, "hidden_dropout": config.dropout,
            "attention_dropout": config.dropout, "initializer_range": 0.02,
            "tie_word_embeddings": config.tie_embeddings}


def llama_config(config: GPTConfig) -> dict[str, Any]:
    return {"hidden_size": config.n_embd, "intermediate_size": config.hidden_width,
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_head, "head_dim": config.head_dim, "hidden_act": "silu",
            "max_position_embeddings": config.block_size, "rms_norm_eps": config.norm_eps,
            "rope_theta": config.rotary_base, "attention_bias": config.bias, "mlp_bias": config.bias,
            "attention_dropout": config.dropout, "initializer_range": 0.02, "pretraining_tp": 1,
            "tie_word_embeddings": config.tie_embeddings}


def gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """GPTConfig fields of a Hugging Face GPT-2 config (vocab_size and bias are read elsewhere)."""
    act = hf.get("activation_function", "gelu_new")
    if act not in GELU_FROM_HF or not hf.get("scale_attn_weights", True):
        raise UserError(f"activation_function={act!r}, scale_attn_weights={hf.get('scale_attn_weights')}: "
                        "this model has a GELU MLP and scaled attention scores")
    return dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], block_size=hf["n_positions"],
                positions="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                mlp=GELU_FROM_HF[act], mlp_hidden=hf.get("n_inner"), block="sequential",
                tie_embeddings=hf.get("tie_word_embeddings", True),
                scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)))


def _rope(hf: dict[str, Any], fraction_key: str | None) -> tuple[float, float]:
    """(base, fraction rotated) from transformers 5.x's rope_parameters or 4.x's flat keys; only the plain
    (unscaled) rotary positions are this model's."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        raise UserError(f"rope type {kind!r}: this model has plain rotary positions only")
    base = rope.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    fraction = rope.get("partial_rotary_factor", hf.get(fraction_key, 1.0) if fraction_key else 1.0)
    return float(base), float(fraction)


def neox_fields(hf: dict[str, Any]) -> dict[str, Any]:
    act = hf.get("hidden_act", "gelu")
    if act not in GELU_FROM_HF:
        raise UserError(f"hidden_act={act!r}: this model's NeoX MLP is GELU (exact or tanh)")
    base, fraction = _rope(hf, "rotary_pct")
    return dict(n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"], n_embd=hf["hidden_size"],
                block_size=hf["max_position_embeddings"], positions="rotary", rotary_base=base,
                rotary_fraction=fraction, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
                mlp=GELU_FROM_HF[act], mlp_hidden=hf["intermediate_size"],
                block="parallel" if hf.get("use_parallel_residual", True) else "sequential",
                tie_embeddings=hf.get("tie_word_embeddings", False), scale_attn_by_inverse_layer_idx=False)


def llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    kv_heads, head_dim = hf.get("num_key_value_heads") or heads, hf.get("head_dim") or width // heads
    problems = []
    if kv_heads != heads:
        problems.append(f"num_key_value_heads={kv_heads} (grouped-query attention; this model has "
                        f"{heads} key/value heads)")
    if head_dim * heads != width:
        problems.append(f"head_dim={head_dim} (this model's is hidden_size / heads = {width // heads})")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (this model's SwiGLU uses silu)")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        problems.append("attention_bias differs from mlp_bias (this model has one bias switch)")
    if problems:
        raise UserError("; ".join(problems))
    base, _ = _rope(hf, None)
    return dict(n_layer=hf["num_hidden_layers"], n_head=heads, n_embd=width,
                block_size=hf["max_position_embeddings"], positions="rotary", rotary_base=base,
                rotary_fraction=1.0, norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
                mlp_hidden=hf["intermediate_size"], block="sequential",
                tie_embeddings=hf.get("tie_word_embeddings", False), scale_attn_by_inverse_layer_idx=False)


# ---------------------------------------------------------------------------------- the architectures

@dataclass(frozen=True)
class Architecture:
    name: str  # the transformers class
    model_type: str
    fits: dict[str, Any]  # GPTConfig fields it requires (a tuple: one of these values)
    rules: Callable[[GPTConfig], list[Rule]]
    config: Callable[[GPTConfig], dict[str, Any]]  # config.json's architecture keys
    fields: Callable[[dict[str, Any]], dict[str, Any]]  # GPTConfig fields of a Hugging Face config


ARCHITECTURES = (
    Architecture("GPT2LMHeadModel", "gpt2",
                 dict(positions="learned", norm="layernorm", mlp=("gelu_tanh", "gelu"), block="sequential"),
                 gpt2_rules, gpt2_config, gpt2_fields),
    Architecture("GPTNeoXForCausalLM", "gpt_neox",
                 dict(positions="rotary", norm="layernorm", mlp=("gelu_tanh", "gelu"),
                      scale_attn_by_inverse_layer_idx=False),
                 neox_rules, neox_config, neox_fields),
    Architecture("LlamaForCausalLM", "llama",
                 dict(positions="rotary", rotary_fraction=1.0, norm="rmsnorm", mlp="swiglu",
                      block="sequential", scale_attn_by_inverse_layer_idx=False),
                 llama_rules, llama_config, llama_fields),
)


def _misfits(architecture: Architecture, config: GPTConfig) -> list[str]:
    """The fields of `config` this architecture cannot take, as `key=<what it needs>`."""
    problems = []
    for key, allowed in architecture.fits.items():
        allowed = allowed if isinstance(allowed, tuple) else (allowed,)
        if getattr(config, key) not in allowed:
            problems.append(f"{key}={' or '.join(map(repr, allowed))}")
    return problems


def architecture_for(config: GPTConfig) -> Architecture:
    """The Hugging Face architecture that computes this config's function, or one line saying why none."""
    for architecture in ARCHITECTURES:
        if not _misfits(architecture, config):
            return architecture
    reasons = "; ".join(f"{a.name} needs {', '.join(_misfits(a, config))}" for a in ARCHITECTURES)
    raise UserError(f"no Hugging Face architecture computes this model ({reasons})")


def architecture_of(model_type: str, source: str) -> Architecture:
    for architecture in ARCHITECTURES:
        if architecture.model_type == model_type:
            return architecture
    names = ", ".join(a.name for a in ARCHITECTURES)
    raise UserError(f"{source} is a {model_type!r} model; this project converts {names}")


def to_hf_tensors(own: dict[str, Tensor], config: GPTConfig, vocab_size: int) -> dict[str, Tensor]:
    """Hugging Face tensors (contiguous) of a state dict `own` of a GPT with `config`, vocabulary cut."""
    architecture = architecture_for(config)
    state = {}
    for rule in architecture.rules(config):
        tensor = own.get(rule.ours)
        if tensor is None:  # a bias this bias-free model lacks
            if not rule.always:
                continue
            tensor = torch.zeros(own[rule.ours.replace(".bias", ".weight")].shape[0])
        if rule.vocab:
            tensor = tensor[:vocab_size]
        state.update(zip(rule.theirs, rule.export(tensor), strict=True))
    return {name: tensor.contiguous() for name, tensor in state.items()}


def from_hf_tensors(hf_state: dict[str, Tensor], config: GPTConfig, architecture: Architecture,
                    source: str) -> dict[str, Tensor]:
    """The state_dict of a GPT with `config` holding a Hugging Face model's tensors: position table cut to
    block_size, vocabulary padded with the mean row; nonzero biases refuse a bias-free config."""
    state = {}
    for rule in architecture.rules(config):
        parts = [hf_state.get(name, hf_state.get(RENAMED_IN_5X.get(name, ""))) for name in rule.theirs]
        is_bias = rule.ours.endswith(".bias")
        if is_bias and not config.bias:
            if any(part is not None and torch.any(part != 0) for part in parts):
                raise UserError(f"{source} has nonzero biases ({rule.theirs[0]}) but model.bias=false; "
                                "set model.bias=true")
            continue
        if is_bias and any(part is None for part in parts):  # Hugging Face's model has none: zeros
            weight = state[rule.ours.replace(".bias", ".weight")]
            state[rule.ours] = torch.zeros(weight.shape[0])
            continue
        tensor = rule.load(*parts)
        if rule.vocab:
            pad = config.vocab_size - tensor.shape[0]
            tensor = torch.cat([tensor, tensor.mean(dim=0, keepdim=True).expand(pad, -1)])
        elif rule.ours == "transformer.wpe.weight":
            tensor = tensor[: config.block_size]
        state[rule.ours] = tensor
    if config.tie_embeddings:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return {name: tensor.contiguous().clone() for name, tensor in state.items()}
