"""Render worker events in a terminal: one tqdm bar per phase, log lines, the final result or error."""

from __future__ import annotations

import sys

from tqdm import tqdm

from medgen.jobs.events import device_label


class TerminalEventView:
    """Callable given to :class:`medgen.slicer.runner.JobRunner` as ``on_event``."""

    def __init__(self, stream=None, verbose: bool = False) -> None:
        self._stream = stream or sys.stderr
        self._verbose = verbose
        self._bar: tqdm | None = None
        self._phase: str | None = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "progress":
            self._show_progress(event)
        elif kind == "started":
            self._write(f"[medgen] {event.get('job_kind')} job started on {device_label(event.get('device', '?'))}")
        elif kind == "log" and (self._verbose or event.get("level") in ("warning", "error")):
            self._write(f"[{event.get('level')}] {event.get('message')}")
        elif kind in ("result", "error"):
            self.close()

    def _show_progress(self, event: dict) -> None:
        if event["phase"] != self._phase or self._bar is None:
            self.close()
            self._phase = event["phase"]
            self._bar = tqdm(total=event["total"], desc=event["phase"], file=self._stream, leave=True, dynamic_ncols=True)
        if self._bar.total != event["total"]:  # a phase may learn its full length late
            self._bar.total = event["total"]
        metrics = {k: v for k, v in event.items() if k not in ("event", "time", "phase", "step", "total", "eta_s")}
        if metrics:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in metrics.items()}, refresh=False)
        self._bar.update(event["step"] - self._bar.n)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
