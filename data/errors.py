"""The project's one exception for user errors.

It lives in `data/` because `data/` is the bottom of the import graph (`optim/` and `gpt/` may import it, it
imports neither). Entry points print its message in one or two lines and exit non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad config, missing data, or an incompatible checkpoint: something the user can fix."""
