"""The model card (README.md) of a Hugging Face export: what was trained, on what, for how long, with which
optimizer, and the validation loss it reached, read from the checkpoint's manifest and the run's
metrics.jsonl, followed by the run's full config and how to load the folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data.tokenizers import Tokenizer
from gpt.checkpoint import read_manifest
from gpt.metrics import METRICS_FILE, read_metrics
from gpt.model import GPT


def _settings(section: dict[str, Any], skip: tuple[str, ...] = ("name",)) -> str:
    return ", ".join(f"{key}={value}" for key, value in section.items()
                     if key not in skip and value is not None)


def final_validation(checkpoint: Path, step: int) -> dict[str, Any] | None:
    """The run's metrics record with `val_loss` at the checkpoint's step (None when the checkpoint travelled
    without its run folder, or the step was not evaluated)."""
    records = read_metrics(checkpoint.parent.parent / METRICS_FILE)
    evaluated = [r for r in records if r.get("step") == step and r.get("val_loss") is not None]
    return evaluated[-1] if evaluated else None


def model_card(model: GPT, tokenizer: Tokenizer, checkpoint: Path) -> str:
    """README.md for the export of `checkpoint` (a checkpoint directory of a run)."""
    manifest = read_manifest(checkpoint)
    config, step = manifest["config"], manifest["step"]
    m, train, data, optim = config["model"], config["train"], config["data"], config["optim"]
    tokens = step * train["global_batch_size"] * m["block_size"]
    record = final_validation(checkpoint, step)
    if record is None:
        loss = f"not in the run's {METRICS_FILE} for step {step}"
    else:
        value = record["val_loss"]
        batches = config.get("protocol", {}).get("eval_batches", 0)
        sequences = (f"{batches} micro-batches of {train['micro_batch_size']} fresh random validation windows"
                     if batches else f"{train['eval_sequences']} validation sequences")
        loss = (f"{value:.4f} nats/token (perplexity {math.exp(value):.2f}) at step {step}, on "
                f"{sequences} of {m['block_size']} tokens")
    attention = ("; trained with attention scores divided by the layer index + 1 "
                 "(`scale_attn_by_inverse_layer_idx`), exported with that factor folded into each layer's "
                 "query projection, since transformers before 5.4 ignores the flag on its default SDPA path"
                 if m.get("scale_attn_by_inverse_layer_idx") else "")
    rows = [
        ("architecture", f"GPT-2 (`GPT2LMHeadModel`): {m['n_layer']} layers, {m['n_head']} heads, width "
                         f"{m['n_embd']}, context {m['block_size']} tokens, "
                         f"{model.num_params():,} parameters{attention}"),
        ("tokenizer", f"`{tokenizer.name}` ({tokenizer.vocab_size:,} tokens)"),
        ("data", f"`{data.get('name')}` ({_settings(data, skip=('name', 'tokenizer'))})"),
        ("training", f"{step:,} steps × {train['global_batch_size']} sequences × {m['block_size']} tokens = "
                     f"{tokens:,} tokens, {train.get('dtype')} autocast, seed {train.get('seed')}"),
        ("optimizer", f"`{optim['name']}` ({_settings(optim)})"),
        ("schedule", f"`{config['schedule']['name']}` ({_settings(config['schedule'])})"),
        ("final validation loss", loss),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, sophia-gpt]
---

# {m.get('name', 'GPT-2')} trained with `{optim['name']}`

Exported by sophia-gpt from `{checkpoint}` (step {step:,}).

| | |
|---|---|
{table}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("FOLDER")
tokenizer = AutoTokenizer.from_pretrained("FOLDER")
```

`<|endoftext|>` (id {tokenizer.eot_id}) separated the training documents; it is the tokenizer's BOS and EOS
token, and generation stops at it.

## The run's config

```yaml
{OmegaConf.to_yaml(OmegaConf.create(config)).rstrip()}
```
"""

