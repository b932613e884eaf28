"""The entry points' error rule: a user error is one `error:` line on stderr and exit status 2, no traceback.

Every script and `train.py` run their main through `run_cli`, so that the rule is one function. An error
another rank reports (`UserError.echo` false) exits without printing, so a job prints each error once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import UserError


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; a `UserError` prints one line and exits 2, anything else keeps its traceback."""
    try:
        main()
    except UserError as e:
        if e.echo:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
