"""This project's GPT in Hugging Face's GPT-2 format (`transformers.GPT2LMHeadModel`), both ways.

The two models compute the same function: the parameter names match, but GPT-2's `Conv1D` stores its weights
as (in, out), transposed relative to `nn.Linear`; Hugging Face's model always has biases, so a bias-free model
exports zeros; and the embedding rows beyond the tokenizer's vocabulary (padding to a multiple of 64 for fast
matmuls) are dropped, which leaves every real token's logit unchanged. Importing pads them back with the mean
of the real rows, whose logits are then the average logit: the loss rises by at most log(1 + pad/vocab)
(< 0.001 for GPT-2's 47 rows), and training pushes them down again. `transformers` and `safetensors` are an
optional extra (`pip install -e '.[hf]'`).

The export is read alike by every `transformers` the `hf` extra allows (4.40 on). A model that scales its
attention by the inverse layer index names eager attention in its config.json: before 5.4.0 (the fix is
huggingface/transformers#44397), GPT-2's SDPA and FlashAttention paths silently ignore that scaling, and
the later 4.x versions pick SDPA by default. Files get the permissions the user's umask gives (safetensors
writes 0600).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.errors import UserError
from common.files import fsync_path
from data.tokenizers import Tokenizer, get_tokenizer
from gpt.model import GPT, GPTConfig
from gpt.sampling import sampling_defaults

HF_EXTRA = "pip install -e '.[hf]'"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
CARD_FILE = "README.md"
TOKENIZER_KEY = "sophia_gpt_tokenizer"  # config.json: the tokenizer this project trained the model with
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
BLOCK_PARAMS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias")
# GPT-2 architecture choices this model hard-codes; a config with other values is another model.
FIXED_ARCHITECTURE = {"activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
                      "scale_attn_weights": True, "tie_word_embeddings": True}


def require_hf() -> None:
    """Fail in one line naming the extra when `transformers` or `safetensors` is missing."""
    try:
        import safetensors  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(f"Hugging Face support needs the optional packages transformers and safetensors "
                        f"({e.name} is not installed): {HF_EXTRA}") from None


# ------------------------------------------------------------------------------------------------- export

def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict[str, Any]:
    """config.json of the exported model: sizes, GPT-2's fixed choices, the real vocabulary, the EOT id, and
    eager attention where 4.x's default attention would compute another function."""
    scaled = {"attn_implementation": "eager"} if config.scale_attn_by_inverse_layer_idx else {}
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": tokenizer.vocab_size, "n_positions": config.block_size, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_by_inverse_layer_idx": config.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": False, **scaled,
        "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id, TOKENIZER_KEY: tokenizer.name,
        **FIXED_ARCHITECTURE,
    }


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: `model.generate` and pipelines sample as scripts/sample.py does by default
    (configs/sample.yaml) and stop at the end-of-text token."""
    defaults = sampling_defaults()
    eot = tokenizer.eot_id
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
            "do_sample": defaults.temperature > 0, "temperature": defaults.temperature or 1.0,
            "top_k": defaults.top_k, "top_p": defaults.top_p, "max_new_tokens": defaults.max_new_tokens}


def to_hf_state(model: GPT, vocab_size: int) -> dict[str, Tensor]:
    """Hugging Face GPT-2 tensors (contiguous, float32) of `model`, its vocabulary cut to `vocab_size`."""
    own = {name: p.detach().float().cpu() for name, p in model.state_dict().items()}
    if vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model only {model.config.vocab_size}")
    state = {"transformer.wte.weight": own["transformer.wte.weight"][:vocab_size],
             "transformer.wpe.weight": own["transformer.wpe.weight"]}
    n_embd = model.config.n_embd
    for i in range(model.config.n_layer):
        prefix = f"transformer.h.{i}."
        for name in BLOCK_PARAMS:
            tensor = own.get(prefix + name)
            if tensor is None:  # a bias-free model: Hugging Face's has biases, so they are zeros
                weight = own[prefix + name.replace(".bias", ".weight")]
                tensor = torch.zeros(weight.shape[0] if weight.dim() == 2 else n_embd)
            elif name in CONV1D_WEIGHTS:
                tensor = tensor.t()
            state[prefix + name] = tensor
    state["transformer.ln_f.weight"] = own["transformer.ln_f.weight"]
    state["transformer.ln_f.bias"] = own.get("transformer.ln_f.bias", torch.zeros(n_embd))
    return {name: tensor.contiguous() for name, tensor in state.items()}  # lm_head: tied to wte, not stored


def write_export_files(model: GPT, tokenizer: Tokenizer, folder: Path, card: str | None = None) -> None:
    """The files of an export, into an existing folder: weights, config.json, generation_config.json, the
    tokenizer's files and the model card, each readable as the user's umask says."""
    from safetensors.torch import save_file

    from gpt.eval.hf_tokenizer import save_tokenizer

    save_file(to_hf_state(model, tokenizer.vocab_size), folder / WEIGHTS_FILE, metadata={"format": "pt"})
    os.chmod(folder / WEIGHTS_FILE, 0o666 & ~current_umask())  # safetensors writes 0600 whatever the umask
    (folder / "config.json").write_text(json.dumps(hf_config(model.config, tokenizer), indent=2) + "\n")
    (folder / GENERATION_FILE).write_text(json.dumps(generation_config(tokenizer), indent=2) + "\n")
    save_tokenizer(tokenizer, folder, model.config.block_size)
    if card is not None:
        (folder / CARD_FILE).write_text(card)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def export_hf(model: GPT, tokenizer: Tokenizer, out: Path, card: str | None = None) -> None:
    """Write a folder that `GPT2LMHeadModel.from_pretrained` and `AutoTokenizer.from_pretrained` load
    offline, with `card` as its README.md. Built under `<out>.tmp` and renamed when complete: a folder named
    `out` is always whole."""
    require_hf()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass a new --out folder or delete it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_export_files(model, tokenizer, tmp, card)
        for path in tmp.iterdir():
            fsync_path(path)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------- import

def float32_argument() -> dict[str, Any]:
    """`from_pretrained`'s float32 argument: `dtype` from transformers 4.56 on, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def read_hf(source: str) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """config.json and float32 tensors of a Hugging Face GPT-2 folder or hub name (downloaded once into
    Hugging Face's cache)."""
    require_hf()
    from transformers import GPT2LMHeadModel

    try:
        hf_model = GPT2LMHeadModel.from_pretrained(source, **float32_argument())
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load Hugging Face model {source!r} ({first}); pass an existing folder, or a "
                        "hub name with internet access (or one already in the Hugging Face cache)") from None
    return hf_model.config.to_dict(), {k: v.detach() for k, v in hf_model.state_dict().items()}


def tokenizer_of(hf: dict[str, Any], source: str) -> Tokenizer:
    """The project tokenizer of a Hugging Face GPT-2: as recorded by our export, else GPT-2's BPE when the
    vocabulary is GPT-2's."""
    name = hf.get(TOKENIZER_KEY) or ("gpt2" if hf["vocab_size"] == get_tokenizer("gpt2").vocab_size else None)
    if name is None:
        raise UserError(f"{source} has a vocabulary of {hf['vocab_size']} tokens, which is neither GPT-2's "
                        "nor one this project exported; this project cannot tokenize for it")
    return get_tokenizer(name)


def check_compatible(hf: dict[str, Any], config: GPTConfig, source: str) -> None:
    """One line naming every shape or architecture difference between a Hugging Face GPT-2 and a model config
    (a shorter `block_size` is allowed: the position table is cut)."""
    problems = [f"{key}={hf[key]} (model.{key}={getattr(config, key)})"
                for key in ("n_layer", "n_head", "n_embd") if hf[key] != getattr(config, key)]
    if hf["n_positions"] < config.block_size:
        problems.append(f"n_positions={hf['n_positions']} (model.block_size={config.block_size} is longer)")
    if hf["vocab_size"] > config.vocab_size:
        problems.append(f"vocab_size={hf['vocab_size']} (model.vocab_size={config.vocab_size} is smaller)")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        problems.append(f"n_inner={hf['n_inner']} (this model's MLP is 4·n_embd wide)")
    for key, value in FIXED_ARCHITECTURE.items():
        if hf.get(key, value) != value:
            problems.append(f"{key}={hf[key]!r} (this model has {value!r})")
    scaled = bool(hf.get("scale_attn_by_inverse_layer_idx", False))
    if scaled != config.scale_attn_by_inverse_layer_idx:
        problems.append(f"scale_attn_by_inverse_layer_idx={scaled} "
                        f"(set model.scale_attn_by_inverse_layer_idx={str(scaled).lower()})")
    if problems:
        raise UserError(f"{source} does not fit the model config: {'; '.join(problems)}; pick the matching "
                        "model= (gpt2: gpt2_small, gpt2-medium: gpt2_medium, ...) or override those keys")


def from_hf_state(hf_state: dict[str, Tensor], config: GPTConfig, source: str) -> dict[str, Tensor]:
    """The state_dict of a GPT with `config` holding a Hugging Face GPT-2's weights (already checked with
    `check_compatible`): Conv1D weights transposed, the position table cut to block_size, the vocabulary
    padded with the mean row. Nonzero biases refuse a bias-free model."""
    state = {}
    wte = hf_state["transformer.wte.weight"]
    pad = config.vocab_size - wte.shape[0]
    state["transformer.wte.weight"] = torch.cat([wte, wte.mean(dim=0, keepdim=True).expand(pad, -1)])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    state["transformer.wpe.weight"] = hf_state["transformer.wpe.weight"][: config.block_size]
    names = [f"transformer.h.{i}.{name}" for i in range(config.n_layer) for name in BLOCK_PARAMS]
    for name in [*names, "transformer.ln_f.weight", "transformer.ln_f.bias"]:
        tensor = hf_state[name]
        if name.endswith(".bias") and not config.bias:
            if torch.any(tensor != 0):
                raise UserError(f"{source} has nonzero biases ({name}) but model.bias=false; "
                                "set model.bias=true")
            continue
        state[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    return {name: tensor.contiguous().clone() for name, tensor in state.items()}


def init_from_hf(model: GPT, source: str) -> None:
    """Overwrite `model`'s weights with a Hugging Face GPT-2's (`train.init_from`), shapes checked first."""
    hf, hf_state = read_hf(source)
    check_compatible(hf, model.config, source)
    state = from_hf_state(hf_state, model.config, source)
    with torch.no_grad():
        model.load_state_dict(state)


def load_hf(source: str) -> tuple[GPT, Tokenizer]:
    """A Hugging Face GPT-2 as this project's GPT of exactly its shapes (vocabulary unpadded), and its
    tokenizer."""
    hf, hf_state = read_hf(source)
    tokenizer = tokenizer_of(hf, source)
    config = GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       block_size=hf["n_positions"], vocab_size=hf["vocab_size"], dropout=0.0,
                       bias=any(torch.any(t != 0).item() for k, t in hf_state.items() if k.endswith(".bias")),
                       scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)))
    check_compatible(hf, config, source)
    model = GPT(config)
    model.load_state_dict(from_hf_state(hf_state, config, source))
    return model, tokenizer
