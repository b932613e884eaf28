"""The project's one exception for user errors.

It lives in `common/`, below every other package (`data/`, `optim/` and `gpt/` import it; it imports none
of them). Entry points print its message in one or two lines and exit non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A bad config, missing data, or an incompatible checkpoint: something the user can fix.

    `echo=False` marks a copy of an error that another rank reports: entry points exit without printing it,
    so a job prints each error once.
    """

    def __init__(self, message: str, *, echo: bool = True) -> None:
        super().__init__(message)
        self.echo = echo
