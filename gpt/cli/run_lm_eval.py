"""lm-evaluation-harness's command line with this project's model class registered as `sophia-gpt`, so a run
or checkpoint is evaluated as it is, without an export. All arguments are the harness's own.

    sophia-lm-eval --model sophia-gpt --model_args pretrained=runs/owt/gpt2_small-adamw-seed1337 \
        --tasks boolq,cb,copa,sglue_rte,wic,wsc,multirc,record --num_fewshot 5 --batch_size 32
    sophia-lm-eval --model hf --model_args pretrained=exports/gpt2_small --device cpu \
        --include_path docs/examples/lm_eval --tasks shakespeare_completion

The first is the Sophia paper's few-shot SuperGLUE (its Fig. 6); docs/evaluation.md says how the harness's
protocol differs from the paper's, and how to define a task from local files (the second: offline). A task
whose data is not cached while the hub is unreachable is one line. Needs the `lm-eval` extra
(`pip install -e '.[lm-eval]'`).
"""

from __future__ import annotations

from gpt.cli import entry_point


def main() -> None:
    from gpt.eval.lm_eval_model import (
        harness_cli,  # registers the model class; one line if lm-eval is missing
    )

    harness_cli()


cli = entry_point(main)
