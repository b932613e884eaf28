"""The commands that read finished runs: one module per command, each with `main(argv=None)` and `cli`, its
entry point: `main` under the rule that a user error is one line and exit status 2 (common/cli.py).

Each `cli` is installed as a command (`[project.scripts]` in pyproject.toml: `sophia-sample`,
`sophia-eval-loss`, ...) that runs from any folder, and `python scripts/<module>.py` runs the same code.
`runs.py` (run directories for the analysis commands) and `model_card.py` (the export's README.md, read
from the checkpoint and the run's metrics) are not commands.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from common.cli import run_cli


def entry_point(main: Callable[[], object]) -> Callable[[], None]:
    return functools.partial(run_cli, main)
