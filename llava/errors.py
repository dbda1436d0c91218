"""Errors that carry a machine-readable reason: `<code>: <detail>`.

Rejected records and replies are kept with their reason, and summaries count them by code.
"""


class ReasonedError(ValueError):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason

    @property
    def code(self) -> str:
        return self.reason.split(":", 1)[0]
