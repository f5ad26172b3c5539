"""The config package's one error."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """The configuration cannot be used.

    Loading collects every problem before raising, so one run shows the
    operator everything to fix.  ``str(error)`` is the problems joined by
    newlines, ready to print without a traceback.

    Args:
        problems: One-line descriptions, each naming the file, the key and
            what is expected, e.g. ``dbgrelay.toml: relay.max_sessions:
            expected a positive integer, got 0``.  A single string is taken as
            one problem.

    Attributes:
        problems: The problem lines, in the order they were found.
        reason: Always ``"bad_config"``: the code used in logs and metrics.
    """

    reason = "bad_config"

    def __init__(self, problems: Iterable[str] | str) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str]]]:
        # Keep the problem list when the error crosses a process boundary.
        return (type(self), (self.problems,))
