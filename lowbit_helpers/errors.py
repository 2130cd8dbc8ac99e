"""The one exception type users see: it names the cause and the fix."""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input or environment, with the way out.

    The command line prints ``cause`` and ``fix`` and exits non-zero without a traceback.
    """

    def __init__(self, cause: str, fix: str):
        super().__init__(f"{cause}\n  fix: {fix}")
        self.cause = cause
        self.fix = fix

    def __reduce__(self):  # back from a worker process whole (its args hold the joined message only)
        return (type(self), (self.cause, self.fix))
