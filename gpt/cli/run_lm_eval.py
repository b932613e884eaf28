"""lm-evaluation-harness's command line with this project's model class registered as `sophia-gpt`, so a run
or checkpoint is evaluated as it is, without an export. All arguments are the harness's own.

    python scripts/run_lm_eval.py --model sophia-gpt \
        --model_args pretrained=runs/owt/gpt2_small-adamw-seed1337 \
        --tasks boolq,cb,copa,sglue_rte,wic,wsc,multirc,record --num_fewshot 5 --batch_size 32

This is the Sophia paper's few-shot SuperGLUE (its Fig. 6); docs/evaluation.md says how the harness's
protocol differs from the paper's. Needs the `lm_eval` extra (`pip install -e '.[lm_eval]'`).
"""

from __future__ import annotations


def main() -> None:
    from gpt.eval.lm_eval_model import (
        harness_cli,  # registers the model class; one line if lm-eval is missing
    )

    harness_cli()

