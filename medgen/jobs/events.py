"""JSON-lines events on stdout, and the worker's :class:`medgen.progress.Reporter`.

Event shapes (one JSON object per line):
- ``{"event": "started", "job_kind", "device", "job_dir", "pid"}``
- ``{"event": "progress", "phase", "step", "total", "eta_s", ...metrics}``
- ``{"event": "log", "level", "message"}``
- ``{"event": "result", "outputs": {name: path}, ...}``
- ``{"event": "error", "kind": "bad_input"|"oom"|"cancelled"|"internal", "message"}``
Every event also carries ``"time"`` (Unix seconds).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from medgen.errors import CancelledError
from medgen.progress import EtaClock

CANCEL_FILE = "cancel"
EVENTS_FILE = "events.jsonl"


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON data: NaN/inf floats as None, numpy/torch scalars as numbers, arrays and tensors as
    lists, sets as lists, paths as strings, and dict keys as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key if isinstance(key, str) else str(json_safe(key)): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(item) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:  # numpy arrays, torch tensors
        return json_safe(value.tolist())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_safe(value.item())
    return value


def device_label(description: dict[str, Any] | str) -> str:
    """A short name for the device of a ``started`` event, e.g. ``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu``.

    Args:
        description: the event's ``device`` (:func:`medgen.devices.describe_device`'s dictionary) or a device string.
    """
    if not isinstance(description, dict):
        return str(description)
    device, name = str(description.get("device", "")), description.get("name")
    return f"{device} ({name})" if name and description.get("type") == "cuda" else device


class EventStream:
    """Writes events to ``stream`` (stdout by default), optionally keeping a copy in the job folder."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self._stream: IO[str] | None = stream or sys.stdout
        self._log_file: IO[str] | None = None
        #: True once the reader of ``stream`` went away (Slicer or ``medgen run`` died, a closed pipe)
        self.reader_gone = False

    def keep_copy_in(self, job_dir: Path) -> None:
        """From now on also append every event to ``JOB_DIR/events.jsonl`` (after validation passed)."""
        self._log_file = open(job_dir / EVENTS_FILE, "a", encoding="utf-8")

    def emit(self, event: str, /, **fields: Any) -> None:
        """Write one event; ``fields`` may hold any keys (a job's result is passed as fields), but never replace the
        event's type or time stamp."""
        document = {"event": event, "time": round(time.time(), 3)}
        document.update((key, value) for key, value in fields.items() if key not in document)  # the stamp wins
        line = json.dumps(json_safe(document), default=str)
        if self._stream is not None:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except BrokenPipeError:  # nobody reads the events any more: the copy in the job folder keeps them
                self._lose_reader()
        if self._log_file:
            try:
                self._log_file.write(line + "\n")
                self._log_file.flush()
            except OSError:  # a full disk or a vanished folder: the copy stops, the events and the outcome do not
                self.close()

    def _lose_reader(self) -> None:
        stream, self._stream, self.reader_gone = self._stream, None, True
        with contextlib.suppress(OSError, ValueError, AttributeError):  # no later flush (at exit) may fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, stream.fileno())
            finally:
                os.close(devnull)

    def close(self) -> None:
        if self._log_file:
            log_file, self._log_file = self._log_file, None
            with contextlib.suppress(OSError):
                log_file.close()


class CancelWatch:
    """True once SIGTERM arrived or ``JOB_DIR/cancel`` exists."""

    def __init__(self, job_dir: Path) -> None:
        self._cancel_file = job_dir / CANCEL_FILE
        self._signalled = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self._signalled = True

    @property
    def requested(self) -> bool:
        return self._signalled or self._cancel_file.exists()


class JobReporter:
    """Reporter that streams progress/log events and raises on cancellation.

    Progress events are throttled to ``min_interval_s`` per phase (the last step of a phase always goes out), so
    a fast inner loop cannot flood the Slicer GUI nor hide the steps of the loops around it.
    """

    def __init__(self, events: EventStream, cancel: CancelWatch, min_interval_s: float = 0.2) -> None:
        self._events = events
        self._cancel = cancel
        self._eta = EtaClock()
        self._min_interval_s = min_interval_s
        self._last_emit_s: dict[str, float] = {}

    def progress(self, phase: str, step: int, total: int, **metrics: Any) -> None:
        eta_s = self._eta.eta_s(phase, step, total)
        now = time.monotonic()
        if step < total and now - self._last_emit_s.get(phase, -math.inf) < self._min_interval_s:
            return
        self._last_emit_s[phase] = now
        self._events.emit(
            "progress", phase=phase, step=int(step), total=int(total),
            eta_s=None if eta_s is None else round(eta_s, 1), **metrics,
        )

    def log(self, message: str, level: str = "info") -> None:
        self._events.emit("log", level=level, message=message)

    def check_cancelled(self) -> None:
        if self._cancel.requested:
            raise CancelledError("Cancelled by the user; outputs written before the cancel are kept.")
        if self._events.reader_gone:
            raise CancelledError("Stopped: the process that started the job (Slicer or medgen run) went away, so nobody "
                                 "followed it any more; outputs and checkpoints written before are kept.")
