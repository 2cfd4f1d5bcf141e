"""Signals during a command: an interrupt ends it as an interrupt, whatever a library makes of it.

torch reports a ``KeyboardInterrupt`` raised while safetensors builds a tensor as a ``ValueError`` (which
would read as a corrupt checkpoint), so the handlers here remember that they raised one and turn the error
the block ends in back into a ``KeyboardInterrupt`` (exit code 130 on the command line).
"""

from __future__ import annotations

import signal
from types import FrameType, TracebackType
from typing import Any


class InterruptWins:
    """While active, each of ``SIGNALS`` raises ``KeyboardInterrupt`` at once and is remembered (``aborted``): the
    block ends in a ``KeyboardInterrupt`` even where a library caught it and raised another error instead."""

    SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT,)

    def __init__(self) -> None:
        self.aborted = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.aborted = True
        raise KeyboardInterrupt

    def __enter__(self) -> InterruptWins:
        try:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        except ValueError:  # not in the main thread
            self._previous = {}
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self.aborted and isinstance(exc, Exception):
            raise KeyboardInterrupt from exc


class GracefulInterrupt(InterruptWins):
    """While active, the first SIGINT (Ctrl-C) or SIGTERM (``kill``, a scheduler's preemption, ``timeout``)
    only sets ``requested``; the training loop saves and stops. A second one aborts, as :class:`InterruptWins`."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            super()._handle(signum, frame)
        self.requested = True
