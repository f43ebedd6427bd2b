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
        """Deliver the events that arrived since the last call; True while the job is still running."""
        if self._process is None:
            return False
        self._drain()
        if self._kill_deadline_s is not None and time.monotonic() > self._kill_deadline_s:
            self._kill_tree(signal.SIGKILL if os.name == "posix" else None)
            self._kill_deadline_s = None
        if self.returncode is None and self._process.poll() is not None:
            self._exited_at_s = self._exited_at_s or time.monotonic()
            pipes_open = any(reader.is_alive() for reader in self._readers)
            if pipes_open and time.monotonic() - self._exited_at_s < PIPE_GRACE_S:
                return True  # its last lines may still be on the way: look again at the next poll (never block the GUI)
            self._drain()
            self._finish(self._process.returncode)
        return self.returncode is None

    def _drain(self) -> None:
        while True:
            try:
                is_stdout, line = self._lines.get_nowait()
            except queue.Empty:
                return
            self._deliver(self._parse(line) if is_stdout else {"event": "log", "level": "stderr", "message": line})

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
                          "memory budgets)") if oom else "; see the log"
                self._deliver({"event": "error", "time": round(time.time(), 3), "kind": "oom" if oom else "internal",
                               "message": f"The worker was killed by {name}{advice}."})
        elif code != ExitCode.OK and stopped and not failed_first:  # stopped on request
            code = ExitCode.CANCELLED
        if code != ExitCode.OK and self.error is None:
            kind = "cancelled" if code == ExitCode.CANCELLED else "internal"
            self._deliver({"event": "error", "time": round(time.time(), 3), "kind": kind,
                           "message": f"The worker ended with exit code {code}; see the log."})
        self.returncode = int(code)

    def wait(self, timeout_s: float | None = None, poll_interval_s: float = 0.05) -> int:
        """Block until the job ends (delivering events meanwhile); returns the exit code.

        Raises:
            TimeoutError: the job was still running after ``timeout_s`` (it keeps running).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"Job {self.job_dir.name} still running after {timeout_s} s.")
            time.sleep(poll_interval_s)
        return int(self.returncode)

    def cancel(self, grace_s: float = CANCEL_GRACE_S) -> None:
        """Ask the worker to stop now; kill its whole process tree if it has not ended after ``grace_s``."""
        if not (self.running and self._process.poll() is None):
            return  # nothing to stop: a cancel file now would cancel the folder's next run at once
        self._cancel_requested = True
        with contextlib.suppress(OSError):  # a read-only job folder: SIGTERM alone stops the worker
            (self.job_dir / CANCEL_FILE).touch()
        self._kill_tree(signal.SIGTERM if os.name == "posix" else None)
        self._kill_deadline_s = time.monotonic() + grace_s

    def _kill_tree(self, sig) -> None:
        """Signal the worker and every process it started (psutil when present, else its process group)."""
        if os.name == "posix" and self._process.poll() is not None:
            # the worker has been reaped, so its pid may belong to another process now; its process group cannot
            # be reused while members (children it left behind) remain, so only the group is signalled
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._process.pid, sig)
            return
        try:
            import psutil

            parent = psutil.Process(self._process.pid)
            processes = parent.children(recursive=True) + [parent]
            for process in processes:
                if sig is None or sig == getattr(signal, "SIGKILL", None):
                    process.kill()
                else:
                    process.send_signal(sig)
        except ImportError:
            if os.name == "posix":
                os.killpg(self._process.pid, sig)
            else:
                self._process.kill()
        except Exception:  # noqa: BLE001 - the process may have ended between the check and the signal
            pass


def run_job_blocking(job_dir: str | os.PathLike, on_event: Callable[[dict], None] | None = None, timeout_s: float | None = None) -> JobRunner:
    """Run a job folder to completion (for the Python console and tests); returns the finished runner."""
    runner = JobRunner(job_dir, on_event=on_event).start()
    runner.wait(timeout_s=timeout_s)
    return runner
