"""The commands that read finished runs: one module per command, each with `main(argv=None)`.

Each is installed as a command (`[project.scripts]` in pyproject.toml: `sophia-sample`, `sophia-eval-loss`,
...) that runs from any folder, and `python scripts/<module>.py` runs the same code. The functions below are
those entry points: a command's module is imported only when it runs, and its user errors are one line
(common/cli.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from common.cli import run_cli


def _entry_point(module: str) -> Callable[[], None]:
    def run() -> None:
        run_cli(lambda: importlib.import_module(f"gpt.cli.{module}").main())

    run.__name__ = module
    return run


sample = _entry_point("sample")
eval_loss = _entry_point("eval_loss")
eval_hellaswag = _entry_point("eval_hellaswag")
export_hf = _entry_point("export_hf")
run_lm_eval = _entry_point("run_lm_eval")
plot_curves = _entry_point("plot_curves")
speedup = _entry_point("speedup")
