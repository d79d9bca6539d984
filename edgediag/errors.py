"""The one user-facing error type: bad input shown as one line (exit code 2) by ``cli.run``."""


class UserError(Exception):
    """A problem with the user's input; shown as one line, exit code 2."""


class NotFittedError(RuntimeError):
    """A model asked to score before its normal statistics are fitted (``fit_normal``)."""
