"""The job controller every MedGen panel shares: Apply turns into Cancel, progress and status follow the job.

A :class:`JobPanel` watches one :class:`medgen.slicer.runner.JobRunner` at a time. A ``qt.QTimer``
calls the runner's ``poll()`` every :data:`POLL_INTERVAL_MS`; the runner forwards the worker's
JSON-lines events to :meth:`JobPanel.handle_event`, which moves the progress bar and rewrites the
status line (phase, step/total, ETA, loss, device) and, when the panel has one, adds the loss to a live
chart (:class:`medgen.slicer.plots.LossPlot`). When the worker exits, the completion callback runs on
the main thread (the timer's thread), where touching the MRML scene is safe.

States::

    idle --track--> running --cancel--> cancelling --exit--> idle ("Cancelled")
                    running --exit 0--> importing --callback ok--> idle ("Done")
                    running --error--> failed          importing --callback raised--> failed
"""

from __future__ import annotations

import enum
import logging
from typing import Any, Callable

import qt

from medgen.jobs.events import device_label

#: how often the runner is polled; fast enough for a smooth bar, slow enough to cost nothing
POLL_INTERVAL_MS = 200


class JobState(enum.Enum):
    """Where the panel's current job is."""

    IDLE = "idle"
    RUNNING = "running"
    CANCELLING = "cancelling"
    IMPORTING = "importing"
    FAILED = "failed"


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``, ``3700`` -> ``"1h01m"``, ``8`` -> ``"8s"``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def describe_progress(event: dict[str, Any], device: str) -> str:
    """The status line for a progress event, e.g. ``train 12/100 | ETA 1m05s | loss 0.0123 | device cuda:0``."""
    parts = [f"{event.get('phase', 'working')} {event.get('step', 0)}/{event.get('total', 0)}"]
    if event.get("eta_s") is not None:
        parts.append(f"ETA {format_duration(event['eta_s'])}")
    if event.get("loss") is not None:
        parts.append(f"loss {event['loss']:.4g}")
    if device:
        parts.append(f"device {device}")
    return " | ".join(parts)


class BusyLock:
    """Buttons that several panels of one module disable while a job runs (Check setup, Install dependencies):
    enabled only while none of the panels holding the lock is busy."""

    def __init__(self, buttons=()) -> None:
        self._buttons = list(buttons)
        self._busy_panels: set[int] = set()

    def hold(self, panel: object, busy: bool) -> None:
        """Record whether ``panel`` is busy and enable the buttons only when no panel is."""
        if busy:
            self._busy_panels.add(id(panel))
        else:
            self._busy_panels.discard(id(panel))
        for button in self._buttons:
            button.enabled = not self._busy_panels


class JobPanel:
    """Drives a panel's Apply button, progress bar and status label from a running job.

    Args:
        apply_button: shows ``Apply`` while idle and ``Cancel`` while a job runs.
        progress_bar: determinate from the job's progress events.
        status_label: phase, step/total, ETA, loss and device; the error message after a failure.
        locked_while_busy: a :class:`BusyLock` shared with the module's other panels (or a list of buttons for
            this panel alone): its buttons (Check setup, Install dependencies) are disabled while a job runs.
        loss_plot: a :class:`medgen.slicer.plots.LossPlot` (or anything with ``reset()``, ``record(event)`` and
            ``flush()``) that each job's loss is drawn on, emptied when a job starts; None draws nothing.
    """

    def __init__(self, apply_button, progress_bar, status_label, locked_while_busy=(), loss_plot=None) -> None:
        self._apply_button = apply_button
        self._apply_text = apply_button.text
        self._progress_bar = progress_bar
        self._status_label = status_label
        self._busy_lock = locked_while_busy if isinstance(locked_while_busy, BusyLock) else BusyLock(locked_while_busy)
        self.loss_plot = loss_plot
        self._can_start = False
        self._runner = None
        self._on_succeeded: Callable[[dict], None] | None = None
        self._device = ""
        self.state = JobState.IDLE
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.poll)
        self._show_state()

    @property
    def busy(self) -> bool:
        """True while a job runs, is being cancelled or its results are being imported."""
        return self.state in (JobState.RUNNING, JobState.CANCELLING, JobState.IMPORTING)

    def set_can_start(self, can_start: bool) -> None:
        """Whether Apply may start a job (the widget's input check); ignored while busy."""
        self._can_start = can_start
        self._show_state()

    def track(self, runner, on_succeeded: Callable[[dict], None], device: str) -> None:
        """Follow a started ``runner``; ``on_succeeded(runner.result)`` runs when it exits cleanly.

        Args:
            runner: a started :class:`medgen.slicer.runner.JobRunner` whose ``on_event`` is
                :meth:`handle_event`.
            on_succeeded: imports the outputs into the scene; an exception it raises marks the job failed.
            device: the requested device, shown until the worker reports the one it uses.
        """
        if self.busy:
            raise RuntimeError("A job is already running in this panel; cancel it first.")
        self._runner, self._on_succeeded, self._device = runner, on_succeeded, device
        self.state = JobState.RUNNING
        self._progress_bar.setRange(0, 0)  # busy indicator until the first progress event
        self._status_label.text = f"Starting | device {device}"
        if self.loss_plot is not None:
            self.loss_plot.reset()
        self._show_state()
        self._timer.start()

    def cancel(self) -> None:
        """Ask the running job to stop; the panel returns to idle once the worker has exited."""
        if self.state is not JobState.RUNNING:
            return
        self.state = JobState.CANCELLING
        self._status_label.text = "Cancelling..."
        self._show_state()
        self._runner.cancel()

    def stop(self) -> None:
        """Stop a running job and wait for it to end (the module is being destroyed: Slicer is closing), so that
        no worker outlives the application."""
        if self._runner is None:
            return
        self._timer.stop()
        self._runner.stop()
        self._finish_idle("Cancelled.")

    def handle_event(self, event: dict[str, Any]) -> None:
        """Show one worker event; pass this as the runner's ``on_event``."""
        if "device" in event:  # the worker's started event describes the device it chose
            self._device = device_label(event["device"])
        if event.get("event") == "progress" and self.state is JobState.RUNNING:
            total = max(int(event.get("total", 0)), 0)
            self._progress_bar.setRange(0, total)
            self._progress_bar.setValue(min(int(event.get("step", 0)), total))
            self._status_label.text = describe_progress(event, self._device)
            if self.loss_plot is not None:
                self.loss_plot.record(event)
        elif event.get("event") == "log":
            logging.info(event.get("message", ""))

    def poll(self) -> None:
        """Timer slot: drain the runner's events and finish the job once the worker has exited."""
        try:
            if self._runner.poll():
                return
        except Exception as error:  # a broken runner must not leave the timer firing forever
            logging.exception("Polling the MedGen job failed")
            self._finish_failed(str(error))
            return
        self._timer.stop()
        if self.loss_plot is not None:
            self.loss_plot.flush()  # the points that arrived since the last throttled redraw
        self._finish()

    def _finish(self) -> None:
        runner = self._runner
        error = runner.error or {}
        finished = runner.returncode == 0 and runner.result is not None  # e.g. a cancel that came as it wrote its outputs
        if not finished and (error.get("kind") == "cancelled" or (self.state is JobState.CANCELLING and not error)):
            self._finish_idle("Cancelled.")
        elif finished:
            self.state = JobState.IMPORTING
            self._status_label.text = "Importing results..."
            self._show_state()
            try:
                self._on_succeeded(runner.result)
            except Exception as import_error:
                logging.exception("Importing the MedGen job results failed")
                self._finish_failed(f"Importing the results failed: {import_error}")
                return
            self._progress_bar.setRange(0, 1)
            self._progress_bar.setValue(1)
            self._finish_idle(f"Done | device {self._device}")
        else:
            message = error.get("message") or f"The worker stopped with exit code {runner.returncode}."
            self._finish_failed(message)

    def _finish_idle(self, message: str) -> None:
        self.state = JobState.IDLE
        self._runner = None
        self._status_label.text = message
        self._show_state()

    def _finish_failed(self, message: str) -> None:
        self._timer.stop()
        self.state = JobState.FAILED
        self._runner = None
        self._progress_bar.setRange(0, 1)
        self._progress_bar.setValue(0)
        self._status_label.text = f"Failed: {message}"
        self._show_state()

    def _show_state(self) -> None:
        """Make the buttons match the state: Apply/Cancel text and which buttons are enabled."""
        if self.state is JobState.RUNNING:
            self._apply_button.text = "Cancel"
            self._apply_button.enabled = True
        elif self.state in (JobState.CANCELLING, JobState.IMPORTING):
            self._apply_button.text = "Cancel"
            self._apply_button.enabled = False
        else:
            self._apply_button.text = self._apply_text
            self._apply_button.enabled = self._can_start
        self._busy_lock.hold(self, self.busy)
