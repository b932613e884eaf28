"""This project's GPT in Hugging Face's formats, both ways: `GPT2LMHeadModel`, `GPTNeoXForCausalLM` or
`LlamaForCausalLM`, whichever computes the model's function (gpt/eval/hf_families.py maps every tensor).

The two models compute the same function. The embedding rows beyond the tokenizer's vocabulary (padding to a
multiple of 64 for fast matmuls) are dropped on export, which leaves every real token's logit unchanged.
Importing pads them back with the mean of the real rows, whose logits are then the average logit: the loss
rises by at most log(1 + pad/vocab) (< 0.001 for GPT-2's 47 rows), and training pushes them down again.
`transformers` and `safetensors` are an optional extra (`pip install -e '.[hf]'`).

The export is read alike by every `transformers` the `hf` extra allows (4.40 on). Before 5.4.0 (the fix is
huggingface/transformers#44397), GPT-2's SDPA and FlashAttention paths silently ignore
`scale_attn_by_inverse_layer_idx`, the later 4.x versions pick SDPA by default, and `from_pretrained`
overrides a config.json's `attn_implementation`. So a model that scales its attention by 1/(layer + 1) is
exported with that factor folded into each layer's query projection (c_attn's q weights and bias) and the
flag off: the same function under every attention path of every version. `LAYER_SCALE_KEY` records the
fold, and importing such a folder undoes it. Files get the permissions the user's umask gives (safetensors
writes 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import secrets
import shutil
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.errors import UserError
from common.files import fsync_path
from data.tokenizers import Tokenizer, get_tokenizer
from gpt.checkpoint.safe_loading import refused_object
from gpt.eval.hf_families import (
    Architecture,
    architecture_for,
    architecture_of,
    from_hf_tensors,
    to_hf_tensors,
)
from gpt.model import GPT, GPTConfig
from gpt.sampling import sampling_defaults

HF_EXTRA = "pip install -e '.[hf]'"
WEIGHTS_FILE = "model.safetensors"
GENERATION_FILE = "generation_config.json"
CARD_FILE = "README.md"
TOKENIZER_KEY = "sophia_gpt_tokenizer"  # config.json: the tokenizer this project trained the model with
LAYER_SCALE_KEY = "sophia_gpt_layer_scale_in_query"  # config.json: 1/(layer + 1) folded into c_attn's q
# Fields a Hugging Face model must match exactly (block_size and vocab_size may be larger there: cut, padded)
MATCHED = tuple(f.name for f in fields(GPTConfig)
                if f.name not in ("block_size", "vocab_size", "dropout", "bias", "mlp_hidden"))


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
    """config.json of the exported model: its architecture's keys, the real vocabulary, the EOT id; a layer
    scale folded into the queries (module docstring)."""
    architecture = architecture_for(config)
    scaled = ({"scale_attn_by_inverse_layer_idx": False, LAYER_SCALE_KEY: True}
              if config.scale_attn_by_inverse_layer_idx else {})
    return {"architectures": [architecture.name], "model_type": architecture.model_type,
            "vocab_size": tokenizer.vocab_size, **architecture.config(config),
            "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id, TOKENIZER_KEY: tokenizer.name,
            **scaled}


def generation_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """generation_config.json: `model.generate` and pipelines sample as scripts/sample.py does by default
    (configs/sample.yaml) and stop at the end-of-text token."""
    defaults = sampling_defaults()
    eot = tokenizer.eot_id
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
            "do_sample": defaults.temperature > 0, "temperature": defaults.temperature or 1.0,
            "top_k": defaults.top_k, "top_p": defaults.top_p, "max_new_tokens": defaults.max_new_tokens}


def to_hf_state(model: GPT, vocab_size: int) -> dict[str, Tensor]:
    """Hugging Face tensors (contiguous, float32) of `model`, its vocabulary cut to `vocab_size`."""
    if vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {vocab_size} tokens but the model only {model.config.vocab_size}")
    own = {name: p.detach().float().cpu() for name, p in model.state_dict().items()}
    tensors = to_hf_tensors(own, model.config, vocab_size)
    if model.config.scale_attn_by_inverse_layer_idx:
        fold_layer_scale(tensors, model.config.n_layer, model.config.n_embd, lambda layer: 1 / (layer + 1))
    return tensors


def fold_layer_scale(tensors: dict[str, Tensor], n_layer: int, n_embd: int,
                     factor: Callable[[int], float]) -> None:
    """Multiply each layer's query projection (the first n_embd outputs of GPT-2's c_attn, a Conv1D stored
    (in, out), and its bias) by factor(layer): q·k scales by the same factor, as the layer scale does."""
    for layer in range(n_layer):
        for kind in ("weight", "bias"):
            name = f"transformer.h.{layer}.attn.c_attn.{kind}"
            if name in tensors:
                tensor = tensors[name].clone()
                tensor[..., :n_embd] *= factor(layer)
                tensors[name] = tensor


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
    """Write a folder that `AutoModelForCausalLM.from_pretrained` (the class config.json names) and
    `AutoTokenizer.from_pretrained` load offline, with `card` as its README.md. Built in a fresh staging
    folder of its own beside `out` (`.<name>.<random>.tmp`) and renamed when complete: a folder named `out`
    is always whole, and nothing that was there before is touched."""
    require_hf()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; pass a new (or empty) folder to export into")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; pass a new --out folder or delete it")
    tmp = _staging_folder(out)
    try:
        write_export_files(model, tokenizer, tmp, card)
        for path in tmp.iterdir():
            fsync_path(path)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
        fsync_path(out.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "I/O error" in str(e)):
            raise UserError(f"cannot write {out} ({getattr(e, 'strerror', None) or e}); its partial files "
                            "were removed: free disk space and rerun") from None
        raise


def _staging_folder(out: Path) -> Path:
    """A new folder beside `out` that no one else uses (mkdir is exclusive: a name taken is retried)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):
            tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.tmp"
            with contextlib.suppress(FileExistsError):
                tmp.mkdir()
                return tmp
    except OSError as e:
        raise UserError(f"cannot create {out} ({e.strerror or e}); choose another --out") from None
    raise UserError(f"cannot find a free staging name beside {out}")


# ------------------------------------------------------------------------------------------------- import

def float32_argument() -> dict[str, Any]:
    """`from_pretrained`'s float32 argument: `dtype` from transformers 4.56 on, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def read_hf(source: str) -> tuple[Architecture, dict[str, Any], dict[str, Tensor]]:
    """The architecture, config.json and float32 tensors of a Hugging Face folder or hub name (downloaded
    once into Hugging Face's cache)."""
    require_hf()
    import transformers

    try:
        model_type = transformers.AutoConfig.from_pretrained(source).model_type
        architecture = architecture_of(model_type, source)
        hf_model = getattr(transformers, architecture.name).from_pretrained(source, **float32_argument())
    except pickle.UnpicklingError as e:  # a weights file that names code: refused unloaded, never run
        raise UserError(f"the weights of {source!r} hold {refused_object(e)}, which is not weight data: "
                        "refused unloaded; use a trusted copy (safetensors cannot hold code)") from None
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load Hugging Face model {source!r} ({first}); pass an existing folder, or a "
                        "hub name with internet access (or one already in the Hugging Face cache)") from None
    hf, state = hf_model.config.to_dict(), {k: v.detach() for k, v in hf_model.state_dict().items()}
    if hf.get(LAYER_SCALE_KEY):  # this project's export of a layer-scaled model: unfold it
        fold_layer_scale(state, hf["n_layer"], hf["n_embd"], lambda layer: layer + 1)
        hf["scale_attn_by_inverse_layer_idx"] = True
    return architecture, hf, state


def tokenizer_of(hf: dict[str, Any], source: str) -> Tokenizer:
    """The project tokenizer of a Hugging Face model: as recorded by our export, else GPT-2's BPE when the
    vocabulary is GPT-2's."""
    name = hf.get(TOKENIZER_KEY) or ("gpt2" if hf["vocab_size"] == get_tokenizer("gpt2").vocab_size else None)
    if name is None:
        raise UserError(f"{source} has a vocabulary of {hf['vocab_size']} tokens, which is neither GPT-2's "
                        "nor one this project exported; this project cannot tokenize for it")
    return get_tokenizer(name)


def hf_gpt_config(architecture: Architecture, hf: dict[str, Any], source: str, **rest: Any) -> GPTConfig:
    """The GPTConfig of a Hugging Face config: its architecture's fields, its vocabulary and `rest`."""
    try:
        return GPTConfig(**architecture.fields(hf), vocab_size=hf["vocab_size"], **rest)
    except UserError as e:
        raise UserError(f"{source} cannot be this project's model: {e}") from None


def check_compatible(architecture: Architecture, hf: dict[str, Any], config: GPTConfig, source: str) -> None:
    """One line naming every shape or architecture difference between a Hugging Face model and a model
    config (a shorter `block_size` is allowed: a position table is cut, rotary positions have none)."""
    theirs = hf_gpt_config(architecture, hf, source)
    problems = [f"{key}={getattr(theirs, key)!r} (model.{key}={getattr(config, key)!r})"
                for key in MATCHED if getattr(theirs, key) != getattr(config, key)]
    if theirs.hidden_width != config.hidden_width:
        problems.append(f"an MLP {theirs.hidden_width} wide (model.mlp_hidden gives {config.hidden_width})")
    if theirs.block_size < config.block_size:
        problems.append(f"{theirs.block_size} positions (model.block_size={config.block_size} is longer)")
    if theirs.vocab_size > config.vocab_size:
        problems.append(f"vocab_size={theirs.vocab_size} (model.vocab_size={config.vocab_size} is smaller)")
    if problems:
        raise UserError(f"{source} does not fit the model config: {'; '.join(problems)}; pick the matching "
                        "model= (gpt2: gpt2_small, gpt2-medium: gpt2_medium, ...) or override those keys")


def init_from_hf(model: GPT, source: str) -> None:
    """Overwrite `model`'s weights with a Hugging Face model's (`train.init_from`), shapes checked first."""
    architecture, hf, hf_state = read_hf(source)
    check_compatible(architecture, hf, model.config, source)
    state = from_hf_tensors(hf_state, model.config, architecture, source)
    with torch.no_grad():
        model.load_state_dict(state)


def load_hf(source: str) -> tuple[GPT, Tokenizer]:
    """A Hugging Face model as this project's GPT of exactly its shapes (vocabulary unpadded), and its
    tokenizer."""
    architecture, hf, hf_state = read_hf(source)
    tokenizer = tokenizer_of(hf, source)
    bias = any(torch.any(t != 0).item() for k, t in hf_state.items() if k.endswith(".bias"))
    config = hf_gpt_config(architecture, hf, source, dropout=0.0, bias=bias)
    model = GPT(config)
    model.load_state_dict(from_hf_tensors(hf_state, config, architecture, source))
    return model, tokenizer
