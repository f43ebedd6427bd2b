"""Progress reporting and cancellation for long computations.

Library functions that run for more than a second take an optional ``reporter`` argument and call
``reporter.progress(...)`` once per step and ``reporter.check_cancelled()`` between steps. The job
worker passes a reporter that streams JSON-lines events and watches the cancel file/SIGTERM; the
Python console and tests use :class:`NullReporter` (the default) or :class:`CallbackReporter`.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Protocol

from medgen.errors import CancelledError


class Reporter(Protocol):
    """What a long computation may call; every method must be cheap."""

    def progress(self, phase: str, step: int, total: int, **metrics: Any) -> None:
        """Report that ``step`` of ``total`` steps of ``phase`` are done (metrics: loss, lr, ...)."""

    def log(self, message: str, level: str = "info") -> None:
        """Report a human-readable line."""

    def check_cancelled(self) -> None:
        """Raise :class:`medgen.errors.CancelledError` if the user asked to stop."""


class EtaClock:
    """Estimates the remaining seconds of each phase from its mean time per step so far.

    Phases keep their own clocks, so nested loops (denoising steps inside candidates inside masks) each get an
    estimate. A phase whose step does not advance (a new run or a new outer item under the same name) restarts.
    """

    def __init__(self) -> None:
        self._clocks: dict[str, tuple[float, int, int]] = {}  # phase -> (start s, first step, last step)

    def eta_s(self, phase: str, step: int, total: int) -> float | None:
        """Seconds left for ``phase``; ``None`` until one step of the phase has been timed."""
        now = time.monotonic()
        start_s, first_step, last_step = self._clocks.get(phase, (now, step, step - 1))
        if step <= last_step:
            start_s, first_step = now, step
        self._clocks[phase] = (start_s, first_step, step)
        done = step - first_step
        if done <= 0 or total <= 0:
            return None
        return max(0.0, (now - start_s) / done * (total - step))


class NullReporter:
    """Reporter that ignores progress and logs and is never cancelled."""

    def progress(self, phase: str, step: int, total: int, **metrics: Any) -> None:
        pass

    def log(self, message: str, level: str = "info") -> None:
        pass

    def check_cancelled(self) -> None:
        pass


class CallbackReporter:
    """Reporter that forwards progress events as dicts to a callable and stops when ``should_stop()``.

    Args:
        on_event: called with ``{"event": "progress"|"log", ...}`` dicts, the same shape as the
            worker's JSON-lines events.
        should_stop: polled by :meth:`check_cancelled`; returning True raises ``CancelledError``.
    """

    def __init__(
        self,
        on_event: Callable[[dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self._on_event = on_event or (lambda event: None)
        self._should_stop = should_stop or (lambda: False)
        self._eta = EtaClock()

    def progress(self, phase: str, step: int, total: int, **metrics: Any) -> None:
        event = {"event": "progress", "phase": phase, "step": int(step), "total": int(total)}
        event["eta_s"] = self._eta.eta_s(phase, step, total)
        event.update(metrics)
        self._on_event(event)

    def log(self, message: str, level: str = "info") -> None:
        self._on_event({"event": "log", "level": level, "message": message})

    def check_cancelled(self) -> None:
        if self._should_stop():
            raise CancelledError("Cancelled by the user.")


def as_reporter(reporter: Reporter | None) -> Reporter:
    """Return ``reporter`` or a :class:`NullReporter` when it is None."""
    return reporter if reporter is not None else NullReporter()


class PhaseReporter:
    """Wraps a reporter and renames every progress phase to ``phase``, so a shared trainer's
    ``training`` phase shows which stage of a multi-stage job runs (``vae``, ``ldm``, ...); with ``total``, the
    steps count against it (a training run in segments, e.g. up to each validation, shows its whole length)."""

    def __init__(self, reporter: Reporter, phase: str, total: int | None = None) -> None:
        self._reporter, self._phase, self._total = reporter, phase, total

    def progress(self, phase: str, step: int, total: int, **metrics) -> None:
        self._reporter.progress(self._phase, step, total if self._total is None else self._total, **metrics)

    def log(self, message: str, level: str = "info") -> None:
        self._reporter.log(message, level)

    def check_cancelled(self) -> None:
        self._reporter.check_cancelled()
