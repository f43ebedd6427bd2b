"""Write job folders and run the worker as a subprocess, streaming its events to callbacks.

Inside Slicer the module widget calls :meth:`JobRunner.poll` from a QTimer, so the GUI never blocks;
the Python console, the CLI and tests call :meth:`JobRunner.wait`. Cancel first asks politely (cancel
file + SIGTERM, the worker stops at its next step and keeps earlier outputs), then kills the whole
process tree after a grace period.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import medgen
from medgen.io.atomic import ensure_folder, write_text_atomic
from medgen.jobs.events import CANCEL_FILE
from medgen.jobs.exit_codes import ExitCode
from medgen.jobs.spec import JOB_FILE, SCHEMA_VERSION, validate_job

CANCEL_GRACE_S = 5.0
#: after the worker exits, how long its output pipes may stay open (a process it started that outlives it holds
#: them) before the job is finished without the rest; poll() never blocks on them meanwhile
PIPE_GRACE_S = 5.0
#: what torchrun sets for its processes; a job worker is a single process and must not see them
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
#: how many of the latest events a runner keeps in memory
EVENTS_KEPT = 10_000
#: the longest one poll() spends delivering events (it runs on Slicer's GUI thread)
POLL_BUDGET_S = 0.05
#: how many of the worker's last stderr lines an error message quotes when the worker gave no reason itself
STDERR_LINES_KEPT = 5


def worker_python() -> str:
    """The Python to run the worker with: ``PythonSlicer`` inside Slicer, else this interpreter."""
    if "slicer" in sys.modules and getattr(sys.modules["slicer"], "app", None) is not None:
        python_slicer = shutil.which("PythonSlicer") or shutil.which("PythonSlicer", path=str(Path(sys.executable).parent))
        if python_slicer:
            return python_slicer
    return sys.executable


def write_job(
    job_root: str | os.PathLike,
    kind: str,
    inputs: dict[str, Any],
    params: dict[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
) -> Path:
    """Create a new job folder under ``job_root`` with a validated ``job.json``.

    Args:
        job_root: folder that collects job folders (created if missing).
        kind: a registered job kind (``medgen.jobs.kinds``).
        inputs: input name -> file path (or list of paths); relative paths are taken from the cwd.
        params: the kind's parameters (validated against its schema; defaults filled by the worker).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: random seed recorded in the manifest.

    Returns:
        The new job folder ``job_root/<kind>-<UTC time>-<random>``.
    """
    absolute_inputs = {name: _absolute(value) for name, value in inputs.items()}
    document = {
        "schema_version": SCHEMA_VERSION, "kind": kind, "inputs": absolute_inputs,
        "params": params or {}, "device": device, "seed": int(seed),
    }
    validate_job(document, Path.cwd())
    job_dir = ensure_folder(job_root) / f"{kind}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    job_dir.mkdir()
    write_text_atomic(job_dir / JOB_FILE, json.dumps(document, indent=2) + "\n")
    return job_dir


def _absolute(value: Any) -> Any:
    """An input path (or list of them) made absolute; an empty path stays empty, for validation to refuse (resolved,
    it would name the current folder)."""
    if isinstance(value, list):
        return [_absolute(item) for item in value]
    return str(Path(value).resolve()) if str(value) else ""


class JobRunner:
    """Runs ``python -m medgen.worker JOB_DIR`` and turns its stdout into event dicts.

    Args:
        job_dir: a folder made by :func:`write_job`.
        python: interpreter for the worker (default :func:`worker_python`).
        on_event: called with each event dict (on the thread that calls :meth:`poll`/:meth:`wait`).
        env: extra environment variables for the worker (e.g. ``CUDA_VISIBLE_DEVICES``).
    """

    def __init__(
        self,
        job_dir: str | os.PathLike,
        python: str | None = None,
        on_event: Callable[[dict], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.job_dir = Path(job_dir)
        self.python = python or worker_python()
        self.on_event = on_event or (lambda event: None)
        self.extra_env = env or {}
        #: the latest events (a long training sends millions); ``result`` and ``error`` are kept apart
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self.result: dict | None = None
        self.error: dict | None = None
        self.returncode: int | None = None
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._kill_deadline_s: float | None = None
        self._exited_at_s: float | None = None
        self._cancel_requested = False
        #: the worker's last stderr lines: a process that dies in native code says why only there
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)

    def start(self) -> "JobRunner":
        """Launch the worker and return at once (a cancel file left by an earlier run of this folder is removed)."""
        (self.job_dir / CANCEL_FILE).unlink(missing_ok=True)
        # PYTHONSAFEPATH and the working folder: "python -m" would put the caller's folder (e.g. a downloaded data
        # set) first on sys.path, so a planted jsonschema.py there would run in the worker
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONSAFEPATH="1", **self.extra_env)
        for name in TORCHRUN_VARIABLES:  # a worker is one process, whatever launched the caller (or was left set)
            env.pop(name, None)
        package_parent = str(Path(medgen.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [self.python, "-m", "medgen.worker", str(self.job_dir.resolve())],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=package_parent,
            text=True, encoding="utf-8", errors="replace", env=env,
            start_new_session=(os.name == "posix"),  # its own process group, so cancel reaches every child
        )
        for stream, is_stdout in ((self._process.stdout, True), (self._process.stderr, False)):
            reader = threading.Thread(target=self._read, args=(stream, is_stdout), daemon=True)
            reader.start()
            self._readers.append(reader)
        return self

    def _read(self, stream, is_stdout: bool) -> None:
        for line in stream:
            self._lines.put((is_stdout, line.rstrip("\n")))
        stream.close()

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    def poll(self) -> bool:
        """Deliver the events that arrived since the last call (at most :data:`POLL_BUDGET_S` of them, the rest at
        the next call, so a chatty worker never holds the GUI); True while the job is still running."""
        if self._process is None or self.returncode is not None:
            return False
        drained = self._drain()
        if self._kill_deadline_s is not None and time.monotonic() > self._kill_deadline_s:
            self._kill_tree(kill=True)  # at every poll until the worker has exited: one kill may miss a racing child
        if self._process.poll() is not None:
            self._exited_at_s = self._exited_at_s or time.monotonic()
            pipes_open = any(reader.is_alive() for reader in self._readers)
            if pipes_open and time.monotonic() - self._exited_at_s < PIPE_GRACE_S:
                return True  # its last lines may still be on the way: look again at the next poll (never block the GUI)
            if not (drained and self._drain()):
                return True  # lines still queued: deliver them before the job counts as ended
            self._finish(self._process.returncode)
        return self.returncode is None

    def _drain(self) -> bool:
        """Deliver queued lines for at most :data:`POLL_BUDGET_S`; True when the queue is empty."""
        stop_at = time.monotonic() + POLL_BUDGET_S
        while time.monotonic() < stop_at:
            try:
                is_stdout, line = self._lines.get_nowait()
            except queue.Empty:
                return True
            if not is_stdout and line.strip():
                self._stderr_tail.append(line.strip())
            self._deliver(self._parse(line) if is_stdout else {"event": "log", "level": "stderr", "message": line})
        return self._lines.empty()

    @staticmethod
    def _parse(line: str) -> dict:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        return event if isinstance(event, dict) and "event" in event else {"event": "log", "level": "info", "message": line}

    def _deliver(self, event: dict) -> None:
        if event["event"] == "result":
            self.result = event
        elif event["event"] == "error":
            self.error = event
        self.events.append(event)
        self.on_event(event)

    def _finish(self, code: int) -> None:
        stopped = self._cancel_requested or (self.job_dir / CANCEL_FILE).exists()
        if self._cancel_requested and os.name == "posix":
            # processes of the cancelled job that outlive the worker (a child that ignored SIGTERM, a grandchild
            # left behind) are still in its process group: no poll would come back for them
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):  # spent: it must not cancel a later run of this folder
            (self.job_dir / CANCEL_FILE).unlink(missing_ok=True)
        failed_first = self.error is not None and self.error.get("kind") != "cancelled"
        if code < 0 and not stopped:  # killed by a signal nobody asked for: the OOM killer, a crash
            number = -code
            name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
            oom = os.name == "posix" and number == signal.SIGKILL
            code = ExitCode.OOM if oom else ExitCode.INTERNAL
            if self.error is None:
                advice = (" (the system's out-of-memory killer ends processes this way: use smaller volumes, batches or "
                          "memory budgets)") if oom else ""
                self._deliver({"event": "error", "time": round(time.time(), 3), "kind": "oom" if oom else "internal",
                               "message": f"The worker was killed by {name}{advice}.{self._last_words()}"})
        elif code != ExitCode.OK and stopped and not failed_first:  # stopped on request
            code = ExitCode.CANCELLED
        if code != ExitCode.OK and self.error is None:
            kind = "cancelled" if code == ExitCode.CANCELLED else "internal"
            words = self._last_words() if kind == "internal" else ""
            self._deliver({"event": "error", "time": round(time.time(), 3), "kind": kind,
                           "message": f"The worker ended with exit code {code}.{words}"})
        self.returncode = int(code)

    def _last_words(self) -> str:
        """The worker's last stderr lines for an error message (they hold the reason of a native crash)."""
        if not self._stderr_tail:
            return " It printed nothing on stderr."
        return " Its last lines on stderr: " + " | ".join(self._stderr_tail)

    def wait(self, timeout_s: float | None = None, poll_interval_s: float = 0.05) -> int:
        """Block until the job ends (delivering events meanwhile); returns the exit code. An interruption while
        waiting (Ctrl+C in the console, an error in ``on_event``) stops the job before it propagates: the worker runs
        in its own session, so nothing else would.

        Raises:
            TimeoutError: the job was still running after ``timeout_s`` (it keeps running).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                if not self.poll():
                    return int(self.returncode)
                time.sleep(poll_interval_s)
            except BaseException:
                self.stop()
                raise
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Job {self.job_dir.name} still running after {timeout_s} s.")

    def stop(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Cancel and block until the job has ended, for a caller that is going away (an interrupted wait, Slicer
        closing): the worker gets ``grace_s`` to stop at its next step, then its processes are killed. Events are no
        longer passed to ``on_event``."""
        if self._process is None or self.returncode is not None:
            return
        self.on_event = lambda event: None
        self.cancel(grace_s)
        with contextlib.suppress(Exception):
            while self.poll():
                time.sleep(0.05)

    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Ask the worker to stop now (cancel file, and SIGTERM on POSIX); kill its processes if it has not ended
        after ``grace_s``."""
        if not (self.running and self._process.poll() is None):
            return  # nothing to stop: a cancel file now would cancel the folder's next run at once
        self._cancel_requested = True
        with contextlib.suppress(OSError):  # a read-only job folder: SIGTERM alone stops the worker
            (self.job_dir / CANCEL_FILE).touch()
        if os.name == "posix":  # elsewhere the worker sees the cancel file at its next step; the kill comes at the deadline
            self._kill_tree(kill=False)
        deadline = time.monotonic() + grace_s  # a second cancel (stop() after Cancel) never postpones the kill
        self._kill_deadline_s = deadline if self._kill_deadline_s is None else min(self._kill_deadline_s, deadline)

    def _kill_tree(self, kill: bool) -> None:
        """SIGKILL (``kill``) or SIGTERM to the worker and every process it started: on POSIX its process group (it
        leads its own session, and children left behind stay in it) plus, with psutil, descendants that left the
        group; elsewhere the psutil tree (or the worker alone). Each process is signalled on its own: one that ended
        meanwhile must not spare the others."""
        posix = os.name == "posix"
        if posix:
            # the group cannot be reused while members remain, even once the worker has been reaped
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            if self._process.poll() is not None:
                return  # reaped: its pid may belong to another process now
        try:
            import psutil
        except ImportError:
            if not posix and kill:
                with contextlib.suppress(OSError):
                    self._process.kill()
            return
        try:
            worker = psutil.Process(self._process.pid)
            processes = [worker, *worker.children(recursive=True)]
        except psutil.Error:
            return
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill() if kill else process.send_signal(signal.SIGTERM)


def run_job_blocking(job_dir: str | os.PathLike, on_event: Callable[[dict], None] | None = None, timeout_s: float | None = None) -> JobRunner:
    """Run a job folder to completion (for the Python console and tests); returns the finished runner. An
    interrupted wait stops the job (:meth:`JobRunner.wait`)."""
    runner = JobRunner(job_dir, on_event=on_event).start()
    runner.wait(timeout_s=timeout_s)
    return runner
