"""The job contract end to end: a real worker subprocess, its events, exit codes, cancel and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import load_volume, save_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.jobs.spec import JOB_FILE
from medgen.slicer.runner import JobRunner, run_job_blocking, write_job


@pytest.fixture
def input_volume(tmp_path, oblique):
    return save_volume(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), tmp_path / "in.nii.gz")


def test_selftest_job_runs_end_to_end_and_keeps_geometry(tmp_path, input_volume):
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 3}, device="cpu", seed=7)
    runner = run_job_blocking(job_dir, timeout_s=120)
    assert runner.returncode == ExitCode.OK, runner.events
    kinds = [event["event"] for event in runner.events if event["event"] != "log"]
    assert kinds[0] == "started" and kinds[-1] == "result" and "progress" in kinds
    started = next(event for event in runner.events if event["event"] == "started")  # the worker's stderr may come first
    assert started["job_kind"] == "selftest" and started["device"]["device"] == "cpu"
    final_progress = [event for event in runner.events if event["event"] == "progress"][-1]
    assert (final_progress["phase"], final_progress["step"], final_progress["total"]) == ("smoothing", 3, 3)
    output = runner.result["outputs"]["image"]
    original, smoothed = load_volume(input_volume), load_volume(output)
    assert torch.allclose(smoothed.affine, original.affine, atol=1e-5)
    assert smoothed.std() < original.std()  # three box-filter passes smooth the noise
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["seed"] == 7 and manifest["params"] == {"steps": 3, "step_delay_s": 0.0}
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["device"]["type"] == "cpu"
    assert "total" in manifest["timings_s"]
    logged = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in logged] == [e["event"] for e in runner.events if e["event"] != "log" or e.get("level") != "stderr"]


def test_cancel_mid_job_stops_the_worker_and_keeps_earlier_outputs(tmp_path, input_volume):
    earlier = run_job_blocking(write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}), timeout_s=120)
    earlier_output = earlier.result["outputs"]["image"]
    earlier_bytes = open(earlier_output, "rb").read()

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 500, "step_delay_s": 0.05})
    runner = JobRunner(job_dir).start()
    deadline = time.monotonic() + 120
    while runner.poll() and not any(e["event"] == "progress" for e in runner.events):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    runner.cancel()
    code = runner.wait(timeout_s=60)
    assert code == ExitCode.CANCELLED
    assert runner.error["kind"] == "cancelled"
    import psutil

    assert not psutil.pid_exists(runner._process.pid) or psutil.Process(runner._process.pid).status() == psutil.STATUS_ZOMBIE
    assert not (job_dir / "outputs" / "selftest.nii.gz").exists()  # no half-written output
    assert open(earlier_output, "rb").read() == earlier_bytes
    assert json.loads((job_dir / "manifest.json").read_text())["status"] == "cancelled"


def test_worker_stops_on_sigterm_alone(tmp_path, input_volume):
    import signal

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 500, "step_delay_s": 0.05})
    runner = JobRunner(job_dir).start()
    while runner.poll() and not any(e["event"] == "progress" for e in runner.events):
        time.sleep(0.05)
    runner._process.send_signal(signal.SIGTERM)
    assert runner.wait(timeout_s=60) == ExitCode.CANCELLED
    assert runner.error["message"].startswith("Cancelled by the user")


def _raw_job(tmp_path, document):
    job_dir = tmp_path / "raw_job"
    job_dir.mkdir()
    (job_dir / JOB_FILE).write_text(document if isinstance(document, str) else json.dumps(document))
    return job_dir


@pytest.mark.parametrize(
    "document, message",
    [
        ("{not json", "not valid JSON"),
        ({"schema_version": 1, "kind": "teleport", "inputs": {}}, "Unknown job kind 'teleport'"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {}}, "'image' is a required property"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "missing.nii.gz"}}, "does not exist"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "in.nii.gz"}, "params": {"steps": 0}}, "params"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "in.nii.gz"}, "device": "tpu"}, "device"),
        # JSON Schema calls 2.0 an integer; the job code cannot use it
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "in.nii.gz"}, "params": {"steps": 2.0}}, "not of type 'integer'"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "in.nii.gz"}, "seed": 2**64}, "seed"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "in.nii.gz"}, "seed": -1}, "job.json is invalid at 'seed'"),
        ({"schema_version": 1, "kind": "selftest"}, "'inputs' is a required property"),
        ({"schema_version": 1, "kind": "selftest", "inputs": {"image": "x" * 300 + ".nii.gz"}}, "is not a usable path"),
    ],
)
def test_bad_job_json_gives_bad_input_and_writes_nothing(tmp_path, input_volume, document, message):
    job_dir = _raw_job(tmp_path, document)
    (job_dir / "in.nii.gz").write_bytes(input_volume.read_bytes())
    before = sorted(p.name for p in job_dir.iterdir())
    runner = run_job_blocking(job_dir, timeout_s=120)
    assert runner.returncode == ExitCode.BAD_INPUT
    assert runner.error["kind"] == "bad_input" and message in runner.error["message"]
    assert sorted(p.name for p in job_dir.iterdir()) == before


def test_corrupted_input_volume_is_bad_input(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"garbage" * 10)
    runner = run_job_blocking(write_job(tmp_path / "jobs", "selftest", {"image": str(broken)}), timeout_s=120)
    assert runner.returncode == ExitCode.BAD_INPUT
    assert "unreadable or corrupted" in runner.error["message"]
    assert json.loads((runner.job_dir / "manifest.json").read_text())["status"] == "bad_input"


def test_write_job_validates_before_creating_anything(tmp_path):
    with pytest.raises(BadInputError, match="Unknown job kind"):
        write_job(tmp_path / "jobs", "nope", {})
    assert not (tmp_path / "jobs").exists()


def test_unusable_cuda_request_is_bad_input(tmp_path, input_volume):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    runner = run_job_blocking(write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, device="cuda:0"), timeout_s=120)
    assert runner.returncode == ExitCode.BAD_INPUT and "CUDA is not usable" in runner.error["message"]


def test_worker_crash_is_reported_as_internal_error(tmp_path, input_volume):
    """A handler bug becomes an 'internal' error event with the traceback logged, exit code 1."""
    from medgen.jobs import kinds

    kinds.register(kinds.JobKind("explode", "math:nonexistent_function", "test", {"type": "object"}, {"type": "object"}))
    job_dir = write_job(tmp_path / "jobs", "explode", {})
    # the worker is a fresh process without our registration: run it in-process instead
    from io import StringIO

    from medgen.jobs.events import EventStream
    from medgen.jobs.worker import run_job

    stream = StringIO()
    code = run_job(job_dir, EventStream(stream))
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert code == ExitCode.INTERNAL
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "internal"
    assert any(e["event"] == "log" and "Traceback" in e["message"] for e in events)


def test_event_stream_lines_are_valid_json_with_eta(tmp_path, input_volume):
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 4, "step_delay_s": 0.25})
    runner = run_job_blocking(job_dir, timeout_s=120)
    etas = [e["eta_s"] for e in runner.events if e["event"] == "progress"]
    assert etas[0] is None and all(isinstance(eta, float) for eta in etas[1:])
    assert etas[-1] == 0.0


def test_runner_uses_this_interpreter_outside_slicer():
    from medgen.slicer.runner import worker_python

    assert worker_python() == sys.executable


def test_a_worker_killed_by_the_system_is_not_reported_as_cancelled(tmp_path, input_volume):
    import signal

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 500, "step_delay_s": 0.05})
    runner = JobRunner(job_dir).start()
    while runner.poll() and not any(e["event"] == "progress" for e in runner.events):
        time.sleep(0.05)
    runner._process.send_signal(signal.SIGKILL)  # what the kernel's out-of-memory killer sends
    assert runner.wait(timeout_s=60) == ExitCode.OOM
    assert runner.error["kind"] == "oom" and "killed by SIGKILL" in runner.error["message"]


def test_a_cancel_file_left_by_an_earlier_run_does_not_cancel_the_next(tmp_path, input_volume):
    from medgen.jobs.events import CANCEL_FILE

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1})
    (job_dir / CANCEL_FILE).touch()
    assert run_job_blocking(job_dir, timeout_s=120).returncode == ExitCode.OK


def test_cpu_and_gpu_allocation_failures_count_as_out_of_memory():
    from medgen.errors import OutOfMemoryError, is_out_of_memory

    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    # CUDA extensions and older torch raise GPU out-of-memory as a plain RuntimeError: its message decides
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity)"))
    assert is_out_of_memory(MemoryError()) and is_out_of_memory(OutOfMemoryError("lower memory_budget_mb"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory budget"))  # only allocation failures say it
    # MONAI re-raises a failing transform as "applying transform ..." with the allocation failure as its cause
    try:
        try:
            raise RuntimeError("std::bad_alloc")
        except RuntimeError as allocation:
            raise RuntimeError("applying transform <ResizeWithPadOrCropd>") from allocation
    except RuntimeError as wrapped:
        assert is_out_of_memory(wrapped)
    try:
        try:
            raise MemoryError()
        except MemoryError:
            raise BadInputError("a clear message about the input") from None
    except BadInputError as refused:
        assert not is_out_of_memory(refused)  # MedGen's own errors keep their kind


def test_recorded_versions_name_the_loaded_build(monkeypatch):
    """A loaded package reports the version it was built as: a CUDA wheel from PyPI says "2.11.0" in its metadata
    but "2.11.0+cu130" in torch.__version__, and the manifest must tell the two builds apart. A package that is not
    loaded is read from its metadata, without importing it."""
    import importlib.metadata
    import types

    import medgen
    from medgen.jobs.manifest import package_versions

    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(__version__="2.11.0+cu130"))
    monkeypatch.delitem(sys.modules, "nibabel", raising=False)
    versions = package_versions()
    assert versions["torch"] == "2.11.0+cu130"
    assert versions["nibabel"] == importlib.metadata.version("nibabel") and "nibabel" not in sys.modules
    assert versions["medgen"] == medgen.__version__ and versions["python"] == sys.version.split()[0]
    try:  # the LMI backend depends on Triton, so its version is recorded (None without it)
        importlib.metadata.version("triton")
        assert versions["triton"] is not None
    except importlib.metadata.PackageNotFoundError:
        assert versions["triton"] is None


def test_a_manifest_that_cannot_be_written_keeps_the_jobs_outcome(tmp_path, input_volume, monkeypatch):
    import medgen.jobs.manifest
    from medgen.jobs.events import EventStream
    from medgen.jobs.worker import run_job

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(medgen.jobs.manifest, "write_manifest", full_disk)
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1})
    import io

    buffer = io.StringIO()
    assert run_job(job_dir, EventStream(buffer)) == ExitCode.OK
    messages = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert any(m["event"] == "log" and "manifest could not be written" in m["message"] for m in messages)


def test_polling_never_blocks_on_pipes_held_open_by_a_process_the_worker_left_behind(tmp_path, monkeypatch):
    """poll() runs on Slicer's GUI thread: a child that outlives the worker (holding its stdout) must not freeze it."""
    import medgen.slicer.runner as runner_module

    monkeypatch.setattr(runner_module, "PIPE_GRACE_S", 1.0)
    fake_python = tmp_path / "python-with-a-leftover-child"
    fake_python.write_text('#!/bin/sh\n( sleep 4 ) &\necho \'{"event": "result", "outputs": {}}\'\nexit 0\n')
    fake_python.chmod(0o755)
    runner = JobRunner(tmp_path, python=str(fake_python)).start()
    started, longest_poll_s = time.monotonic(), 0.0
    while True:
        before = time.monotonic()
        running = runner.poll()
        longest_poll_s = max(longest_poll_s, time.monotonic() - before)
        if not running:
            break
        time.sleep(0.05)
    assert runner.returncode == ExitCode.OK and runner.result == {"event": "result", "outputs": {}}
    assert longest_poll_s < 0.5 and time.monotonic() - started < 3.5  # finished without waiting for the child


def test_a_job_folder_with_planted_links_is_refused_and_nothing_outside_it_is_written(tmp_path, input_volume):
    """A job folder from someone else could link outputs/ to a folder of results, or events.jsonl to a file."""
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    precious = tmp_path / "results"
    precious.mkdir()
    (precious / "selftest.nii.gz").write_bytes(b"precious")
    (job_dir / "outputs").symlink_to(precious)
    runner = run_job_blocking(job_dir, timeout_s=120)
    assert runner.returncode == ExitCode.BAD_INPUT and "symbolic links ['outputs']" in runner.error["message"]
    assert (precious / "selftest.nii.gz").read_bytes() == b"precious"


def test_modules_in_the_callers_folder_never_shadow_the_workers(tmp_path, input_volume, monkeypatch):
    """'python -m' puts the working folder first on sys.path: a jsonschema.py in a downloaded data set would run."""
    (tmp_path / "jsonschema.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\nraise SystemExit(3)\n")
    monkeypatch.chdir(tmp_path)
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    assert run_job_blocking(job_dir, timeout_s=120).returncode == ExitCode.OK
    # started by hand as the README shows, from that folder, without the runner's PYTHONSAFEPATH
    import medgen

    environment = {name: value for name, value in os.environ.items() if name != "PYTHONSAFEPATH"}
    environment["PYTHONPATH"] = str(Path(medgen.__file__).resolve().parent.parent)
    by_hand = subprocess.run([sys.executable, "-m", "medgen.worker", str(job_dir)], cwd=tmp_path, env=environment,
                             capture_output=True, text=True, timeout=120)
    assert by_hand.returncode == ExitCode.OK, by_hand.stderr
    assert not (tmp_path / "imported").exists()


def test_a_second_run_of_a_busy_job_folder_is_refused_and_leaves_its_files_alone(tmp_path, input_volume):
    from medgen.io.folder_lock import exclusive_folder

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    with exclusive_folder(job_dir, "job folder"):  # as a first run holds it
        runner = run_job_blocking(job_dir, timeout_s=120)
    assert runner.returncode == ExitCode.BAD_INPUT and "is in use by another run" in runner.error["message"]
    assert not (job_dir / "manifest.json").exists() and not (job_dir / "outputs").exists()


def test_a_failed_rerun_keeps_the_manifest_of_the_outputs_still_there(tmp_path, input_volume):
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    assert run_job_blocking(job_dir, timeout_s=120).returncode == ExitCode.OK
    first = json.loads((job_dir / "manifest.json").read_text())
    input_volume.write_bytes(b"no longer a volume")
    assert run_job_blocking(job_dir, timeout_s=120).returncode == ExitCode.BAD_INPUT
    (archived,) = (job_dir / "manifests").iterdir()
    assert json.loads(archived.read_text()) == first and first["outputs"]["image"].endswith("selftest.nii.gz")
    assert json.loads((job_dir / "manifest.json").read_text())["status"] == "bad_input"


def test_a_rerun_of_a_generating_job_sets_the_earlier_outputs_aside(tmp_path, input_volume):
    """A job that does not resume starts from an empty outputs/: the earlier run's files go to earlier_outputs/<stamp>/,
    named like its archived manifest, instead of mixing with the new ones."""
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    assert run_job_blocking(job_dir, timeout_s=120).returncode == ExitCode.OK
    (job_dir / "outputs" / "left_by_run_1.txt").write_text("x")
    first_output = (job_dir / "outputs" / "selftest.nii.gz").read_bytes()
    assert run_job_blocking(job_dir, timeout_s=120).returncode == ExitCode.OK
    assert sorted(path.name for path in (job_dir / "outputs").iterdir()) == ["selftest.nii.gz"]
    (archived,) = (job_dir / "manifests").iterdir()
    (earlier,) = (job_dir / "earlier_outputs").iterdir()
    assert earlier.name == archived.stem and (earlier / "manifest.json").read_bytes() == archived.read_bytes()
    assert (earlier / "left_by_run_1.txt").is_file() and (earlier / "selftest.nii.gz").read_bytes() == first_output


def test_library_warnings_become_log_events(tmp_path, input_volume, monkeypatch):
    """A warning logged on the medgen logger (here by the volume reader) reaches the job's events, in-process."""
    import logging

    from medgen.jobs import selftest
    from medgen.jobs.events import EventStream
    from medgen.jobs.worker import run_job

    original = selftest.load_volume

    def load_with_warning(*args, **kwargs):
        logging.getLogger("medgen.io.volumes").warning("input image: a warning from the reader")
        return original(*args, **kwargs)

    monkeypatch.setattr(selftest, "load_volume", load_with_warning)
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    events = []
    stream = EventStream()
    monkeypatch.setattr(stream, "emit", lambda event, **fields: events.append({"event": event, **fields}))
    assert run_job(job_dir, stream) == ExitCode.OK
    assert {"event": "log", "level": "warning", "message": "input image: a warning from the reader"} in events
    assert not logging.getLogger("medgen").handlers  # removed when the job ends


def test_training_kinds_resume_from_their_outputs_and_the_others_do_not():
    from medgen.jobs.kinds import known_kinds

    resuming = {kind.name for kind in known_kinds() if kind.resumes}
    assert resuming == {"finetune", "finetune-generator", "synth-train", "maskgen-train", "translate-train"}


def test_file_system_failures_are_bad_input_naming_the_path(tmp_path, input_volume, monkeypatch):
    import errno

    from medgen.jobs import selftest
    from medgen.jobs.events import EventStream
    from medgen.jobs.worker import run_job

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    (job_dir / "outputs").write_text("a file where the outputs folder goes")
    lines = []
    stream = type("Lines", (), {"write": lambda self, text: lines.append(text), "flush": lambda self: None})()
    assert run_job(job_dir, EventStream(stream)) == ExitCode.BAD_INPUT
    assert "is a file, but a folder is needed there" in json.loads(lines[-1])["message"]

    (job_dir / "outputs").unlink()

    def full_disk(context):
        raise OSError(errno.ENOSPC, "No space left on device", str(job_dir / "outputs" / "selftest.nii.gz"))

    monkeypatch.setattr(selftest, "run_selftest", full_disk)
    assert run_job(job_dir, EventStream(stream)) == ExitCode.BAD_INPUT
    error = json.loads(lines[-1])
    assert error["kind"] == "bad_input" and "No space left on device: " in error["message"] and "Free disk" in error["message"]


def test_cancel_does_nothing_to_a_finished_job_and_its_file_never_outlives_the_run(tmp_path, input_volume):
    from medgen.jobs.events import CANCEL_FILE

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    runner = run_job_blocking(job_dir, timeout_s=120)
    runner.cancel()
    assert not (job_dir / CANCEL_FILE).exists() and runner.returncode == ExitCode.OK
    runner = JobRunner(job_dir).start()
    cancel_file_seen = False
    while runner.poll():
        if not cancel_file_seen and any(e["event"] == "started" for e in runner.events):
            runner.cancel()
            cancel_file_seen = (job_dir / CANCEL_FILE).exists()
        time.sleep(0.02)
    assert not (job_dir / CANCEL_FILE).exists()  # a direct `python -m medgen.worker` run afterwards is not cancelled


def test_the_worker_never_sees_torchrun_variables_of_its_caller(tmp_path, monkeypatch):
    """A worker is one process: WORLD_SIZE left in a cluster shell would make its training wait for a process group."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    fake_python = tmp_path / "python-reporting-its-environment"
    fake_python.write_text('#!/bin/sh\necho "{\\"event\\": \\"result\\", \\"outputs\\": {}, \\"seen\\": \\"${WORLD_SIZE:-none}${RANK:-none}\\"}"\n')
    fake_python.chmod(0o755)
    runner = JobRunner(tmp_path, python=str(fake_python)).start()
    runner.wait(timeout_s=30)
    assert runner.result["seen"] == "nonenone"


def _fake_worker(tmp_path, name, script):
    """A shell script standing in for the interpreter: it is run as ``SCRIPT -m medgen.worker JOB_DIR``."""
    fake_python = tmp_path / name
    fake_python.write_text("#!/bin/sh\n" + script)
    fake_python.chmod(0o755)
    return str(fake_python)


def _poll_until_started(runner, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while runner.poll() and not any(e["event"] == "started" for e in runner.events):
        assert time.monotonic() < deadline, list(runner.events)
        time.sleep(0.05)
    assert runner.running, list(runner.events)


def _kill_process_group(runner):
    """Clean-up: whatever the test left of the fake worker's process group is killed and the worker reaped."""
    import contextlib
    import signal

    if runner._process is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(runner._process.pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            runner._process.wait(timeout=30)


def test_a_worker_ignoring_sigterm_is_killed_after_the_grace_period_and_counts_as_cancelled(tmp_path):
    """A worker stuck where SIGTERM cannot reach it (here: ignored) is killed once the grace period is over, and
    that SIGKILL, asked for by the cancel, is reported as a cancel, never as the system's out-of-memory killer."""
    python = _fake_worker(tmp_path, "python-ignoring-sigterm",
                          "trap '' TERM\necho '{\"event\": \"started\"}'\nsleep 120\n")
    runner = JobRunner(tmp_path, python=python).start()
    try:
        _poll_until_started(runner)
        runner.cancel(grace_s=0.5)
        assert runner.wait(timeout_s=30) == ExitCode.CANCELLED
        assert runner.error["kind"] == "cancelled", list(runner.events)
    finally:
        _kill_process_group(runner)


def test_a_cancel_kills_the_processes_a_worker_left_behind_when_it_exited(tmp_path):
    """A worker that stops on SIGTERM may leave a child ignoring it (a data-loader process, a tool it ran): once
    the grace period is over, that child is killed through the worker's process group although the worker is gone."""
    import psutil

    python = _fake_worker(tmp_path, "python-leaving-a-child",
                          "trap '' TERM\nsleep 120 &\necho $! > \"$3/leftover.pid\"\n"  # the child ignores TERM from its start
                          "trap 'exit 4' TERM\necho '{\"event\": \"started\"}'\nwhile :; do sleep 120 & wait; done\n")
    runner = JobRunner(tmp_path, python=python).start()
    try:
        _poll_until_started(runner)
        leftover = int((tmp_path / "leftover.pid").read_text())
        runner.cancel(grace_s=0.5)
        runner._process.wait(timeout=30)  # the worker has exited before the grace period is seen to be over
        assert runner.wait(timeout_s=30) == ExitCode.CANCELLED
        deadline = time.monotonic() + 20
        while psutil.pid_exists(leftover) and psutil.Process(leftover).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the worker's leftover child survived the cancel"
            time.sleep(0.05)
    finally:
        _kill_process_group(runner)


def _gone(pid, timeout_s=20.0) -> bool:
    import psutil

    deadline = time.monotonic() + timeout_s
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_cancelled_job_leaves_no_process_although_the_worker_stopped_at_once(tmp_path):
    """A child ignoring SIGTERM that does not hold the worker's output (so nothing keeps the job open) must not
    outlive a worker that stops promptly: the job ends long before the kill deadline."""
    python = _fake_worker(tmp_path, "python-leaving-a-quiet-child",
                          "(trap '' TERM; exec sleep 120) </dev/null >/dev/null 2>&1 &\necho $! > \"$3/leftover.pid\"\n"
                          "trap 'exit 4' TERM\necho '{\"event\": \"started\"}'\nwhile :; do sleep 120 & wait; done\n")
    runner = JobRunner(tmp_path, python=python).start()
    try:
        _poll_until_started(runner)
        leftover = int((tmp_path / "leftover.pid").read_text())
        runner.cancel(grace_s=120)  # the deadline never comes: the end of the job must take the child along
        assert runner.wait(timeout_s=30) == ExitCode.CANCELLED
        assert _gone(leftover), "the cancelled job's child survived it"
    finally:
        _kill_process_group(runner)


def test_an_interrupted_wait_stops_the_job(tmp_path):
    """Ctrl+C in the Python console while waiting: the worker runs in its own session, so the wait must stop it."""
    python = _fake_worker(tmp_path, "python-running-on", "echo $$ > \"$3/worker.pid\"\necho '{\"event\": \"started\"}'\n"
                                                         "while :; do sleep 120 & wait; done\n")

    def interrupt(event):
        if event["event"] == "started":
            raise KeyboardInterrupt

    runner = JobRunner(tmp_path, python=python, on_event=interrupt).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            runner.wait(timeout_s=60)
        assert runner.returncode == ExitCode.CANCELLED and _gone(int((tmp_path / "worker.pid").read_text()), 1.0)
    finally:
        _kill_process_group(runner)


def test_a_chatty_worker_never_holds_one_poll_long_and_every_line_arrives(tmp_path, monkeypatch):
    """poll() runs on Slicer's GUI thread: it delivers for a bounded time and leaves the rest for the next call."""
    import medgen.slicer.runner as runner_module

    monkeypatch.setattr(runner_module, "POLL_BUDGET_S", 0.01)
    python = _fake_worker(tmp_path, "python-chatty", "seq 1 20000\n")
    delivered = []
    runner = JobRunner(tmp_path, python=python, on_event=lambda event: delivered.append(time.sleep(1e-4))).start()
    try:
        runner._process.wait(timeout=30)
        time.sleep(0.5)  # the lines are queued: one unbounded poll would now deliver all of them (2 s or more)
        longest = 0.0
        while True:
            started = time.monotonic()
            running = runner.poll()
            longest = max(longest, time.monotonic() - started)
            if not running:
                break
        assert len(delivered) >= 20000 and longest < 0.5
    finally:
        _kill_process_group(runner)


def test_a_failure_while_stopping_keeps_its_own_exit_code(tmp_path):
    """A worker that runs out of memory while it stops reports that error and exit code: the cancel must not hide
    it behind a 'cancelled' outcome."""
    python = _fake_worker(
        tmp_path, "python-failing-on-sigterm",
        "trap 'echo \"{\\\"event\\\": \\\"error\\\", \\\"kind\\\": \\\"oom\\\", \\\"message\\\": \\\"Out of memory.\\\"}\"; exit 3' TERM\n"
        "echo '{\"event\": \"started\"}'\nwhile :; do sleep 120 & wait; done\n")  # a TERM-ed sleep only loops
    runner = JobRunner(tmp_path, python=python).start()
    try:
        _poll_until_started(runner)
        runner.cancel(grace_s=120)  # never killed: the exit code is the worker's own
        assert runner.wait(timeout_s=60) == ExitCode.OOM
        assert runner.error == {"event": "error", "kind": "oom", "message": "Out of memory."}
    finally:
        _kill_process_group(runner)


def test_a_worker_dying_in_native_code_is_reported_with_its_last_words_on_stderr(tmp_path):
    """An abort in native code (here OpenMP's duplicate-runtime check) gives its reason only on stderr, which no
    file of the job folder keeps: the error message must carry it."""
    python = _fake_worker(tmp_path, "python-aborting",
                          "echo 'OMP: Error #15: Initializing libiomp5.so, but found libomp.so already initialized.' >&2\n"
                          "kill -ABRT $$\n")
    runner = JobRunner(tmp_path, python=python).start()
    try:
        assert runner.wait(timeout_s=60) == ExitCode.INTERNAL
        assert runner.error["message"] == ("The worker was killed by SIGABRT. Its last lines on stderr: OMP: Error #15: "
                                           "Initializing libiomp5.so, but found libomp.so already initialized.")
    finally:
        _kill_process_group(runner)


def test_stderr_lines_are_logged_and_never_read_as_events(tmp_path):
    """Only stdout carries events: a JSON line on stderr (a library printing one) is a 'stderr' log line, never a
    result."""
    line = '{"event": "result", "outputs": {"image": "/not/a/result.nii.gz"}}'
    python = _fake_worker(tmp_path, "python-writing-json-on-stderr", f"echo '{line}' >&2\nexit 1\n")
    runner = JobRunner(tmp_path, python=python).start()
    try:
        assert runner.wait(timeout_s=60) == ExitCode.INTERNAL
        assert runner.result is None
        assert {"event": "log", "level": "stderr", "message": line} in runner.events
    finally:
        _kill_process_group(runner)


@pytest.fixture
def sigterm_handler_kept():
    """run_job installs the worker's SIGTERM handler; in-process runs give pytest its own back."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _run_in_process(job_dir):
    from io import StringIO

    from medgen.jobs.events import EventStream
    from medgen.jobs.worker import run_job

    stream = StringIO()
    code = run_job(job_dir, EventStream(stream))
    return code, [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.parametrize("error, exit_code, kind", [
    (torch.OutOfMemoryError("CUDA error: allocation failed"), ExitCode.OOM, "oom"),
    (MemoryError(), ExitCode.OOM, "oom"),
    (KeyboardInterrupt(), ExitCode.CANCELLED, "cancelled"),
], ids=["torch_oom", "python_oom", "ctrl_c"])
def test_a_handler_out_of_memory_or_interrupted_gets_its_own_exit_code(tmp_path, input_volume, monkeypatch, error, exit_code,
                                                                       kind, sigterm_handler_kept):
    """Out-of-memory errors (recognised by their type, whatever their message) get exit code 3 and advice, and Ctrl+C in
    a terminal running ``python -m medgen.worker`` is a cancel (exit code 4): neither is the 'internal error' of a bug."""
    from medgen.jobs import selftest

    def failing(context):
        raise error

    monkeypatch.setattr(selftest, "run_selftest", failing)
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    code, events = _run_in_process(job_dir)
    assert code == exit_code
    assert events[-1]["event"] == "error" and events[-1]["kind"] == kind
    assert json.loads((job_dir / "manifest.json").read_text())["status"] == kind
    if kind == "oom":
        assert events[-1]["message"].startswith("Out of memory.") and type(error).__name__ in events[-1]["message"]


def test_a_seed_beyond_numpys_range_runs_and_is_recorded(tmp_path, input_volume, sigterm_handler_kept):
    """job.json allows seeds up to 2**63 - 1; NumPy takes only 32 bits, so the worker must not hand it the seed as is."""
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu", seed=2**40 + 3)
    code, events = _run_in_process(job_dir)
    assert code == ExitCode.OK, events[-1]
    assert json.loads((job_dir / "manifest.json").read_text())["seed"] == 2**40 + 3


def test_a_worker_whose_reader_went_away_stops_as_cancelled_and_keeps_its_events(tmp_path, input_volume, sigterm_handler_kept):
    """When Slicer or ``medgen run`` dies, the worker's next event meets a closed pipe: it stops at its next step with
    a cancelled outcome in events.jsonl and the manifest (it died on the broken pipe, an unexplained internal error)."""
    from medgen.jobs.events import EventStream
    from medgen.jobs.worker import run_job

    class ClosedAfterStart:
        lines = 0

        def write(self, text):
            self.lines += 1
            if self.lines > 2:  # "started" and the first progress got through
                raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 200, "step_delay_s": 0.01},
                        device="cpu")
    assert run_job(job_dir, EventStream(ClosedAfterStart())) == ExitCode.CANCELLED
    kept = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    assert kept[-1]["event"] == "error" and kept[-1]["kind"] == "cancelled" and "went away" in kept[-1]["message"]
    assert json.loads((job_dir / "manifest.json").read_text())["status"] == "cancelled"
    assert not (job_dir / "outputs" / "selftest.nii.gz").exists()


def test_a_volume_with_nan_is_bad_input_naming_its_file(tmp_path, input_volume, sigterm_handler_kept):
    holed = load_volume(input_volume)
    holed[0, 2, 3, 4] = float("nan")
    path = save_volume(holed, tmp_path / "holed scan.nii.gz")
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(path)}, {"steps": 1}, device="cpu")
    code, events = _run_in_process(job_dir)
    assert code == ExitCode.BAD_INPUT
    assert events[-1]["message"].startswith("input image holed scan.nii.gz contains 1 NaN or infinite voxel(s)")


def test_a_planted_link_at_the_event_log_is_refused_and_its_target_left_alone(tmp_path, input_volume, sigterm_handler_kept):
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    target = tmp_path / "someone_elses.log"
    target.write_text("kept\n")
    (job_dir / "events.jsonl").symlink_to(target)
    code, events = _run_in_process(job_dir)
    assert code == ExitCode.BAD_INPUT and "symbolic links ['events.jsonl']" in events[-1]["message"]
    assert target.read_text() == "kept\n"


def test_a_rerun_appends_to_the_event_log_of_the_earlier_runs(tmp_path, input_volume, sigterm_handler_kept):
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}, {"steps": 1}, device="cpu")
    for _ in range(2):
        assert _run_in_process(job_dir)[0] == ExitCode.OK
    logged = [json.loads(line)["event"] for line in (job_dir / "events.jsonl").read_text().splitlines()]
    assert logged.count("started") == 2 and logged.count("result") == 2


def test_a_folder_without_job_json_is_bad_input_and_stays_empty(tmp_path):
    job_dir = tmp_path / "not_a_job"
    job_dir.mkdir()
    code, events = _run_in_process(job_dir)
    assert code == ExitCode.BAD_INPUT
    assert events[-1]["kind"] == "bad_input" and events[-1]["message"].startswith("No job.json in")
    assert list(job_dir.iterdir()) == []


def test_a_job_json_that_is_not_text_is_bad_input(tmp_path):
    job_dir = tmp_path / "binary_job"
    job_dir.mkdir()
    (job_dir / JOB_FILE).write_bytes(b"\xff\xfe\x00{")
    code, events = _run_in_process(job_dir)
    assert code == ExitCode.BAD_INPUT and "is not valid JSON" in events[-1]["message"]


@pytest.mark.parametrize("kind, inputs, params, message_parts", [
    # the words between the value and the location are jsonschema's ("should be non-empty" from 4.21, "is too short" before)
    ("selftest", {"image": ""}, {}, ("Input 'image' of the selftest job: '' ", " (job.json 'inputs/image')")),
    ("translate-train", {"volumes": []}, {}, ("Input 'volumes' of the translate-train job: [] ", " (job.json 'inputs/volumes')")),
    ("selftest", {"image": "in.nii.gz"}, {"step": 3}, ("Additional properties are not allowed ('step' was unexpected)",)),
    ("translate-train", {"volumes": ["in.nii.gz"]}, {"grid": [32, 32, 0]},
     ("Parameter 'grid' of the translate-train job: 0 is less than the minimum of 8 (job.json 'params/grid/2')",)),
    ("translate-train", {"volumes": ["in.nii.gz"]}, {"lr": float("nan")},
     ("Parameter 'lr' of the translate-train job: nan is not a finite number (job.json 'params/lr')",)),
    ("translate-train", {"volumes": ["in.nii.gz"]}, {"memory_budget_mb": float("inf")}, ("'memory_budget_mb'", "inf is not a finite")),
    ("maskgen-train", {"source_images": ["in.nii.gz"], "source_labels": ["in.nii.gz"], "target_images": ["in.nii.gz"]},
     {"source_modality": "CT", "target_modality": "MR", "seed": 2**64},  # torch.manual_seed overflowed: an internal error
     ("Parameter 'seed' of the maskgen-train job: 18446744073709551616 is greater than the maximum",)),
], ids=["empty_path", "empty_path_list", "unknown_parameter", "item_of_a_list_parameter", "nan", "infinity", "seed_beyond_64_bits"])
def test_validation_refuses_and_names_the_input_or_parameter(tmp_path, input_volume, kind, inputs, params, message_parts):
    """An empty path (which would mean the job folder itself), an empty list of volumes, a misspelt parameter, a bad
    item of a list parameter and a NaN or infinite number (schema bounds never refuse NaN) are each refused before any
    work, naming the input or parameter as the panels do."""
    from medgen.jobs.spec import validate_job

    with pytest.raises(BadInputError) as refused:
        validate_job({"schema_version": 1, "kind": kind, "inputs": inputs, "params": params}, tmp_path)
    assert all(part in str(refused.value) for part in message_parts), str(refused.value)


def test_validation_resolves_input_paths_and_fills_the_defaults(tmp_path, input_volume):
    from medgen.jobs.spec import validate_job

    (tmp_path / "sub").mkdir()
    spec = validate_job({"schema_version": 1, "kind": "selftest", "inputs": {"image": "sub/../in.nii.gz"}}, tmp_path)
    assert spec.inputs == {"image": str(input_volume.resolve())}
    assert (spec.device, spec.seed, spec.params) == ("auto", 0, {"steps": 5, "step_delay_s": 0.0})


def test_an_empty_outputs_folder_is_not_set_aside(tmp_path):
    from medgen.jobs.context import set_aside_outputs

    (tmp_path / "outputs").mkdir()
    assert set_aside_outputs(tmp_path) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["outputs"]


def test_manifests_archived_within_the_same_second_are_all_kept(tmp_path):
    """Two runs of a folder in one second (a failed start, then a retry) must not overwrite the earlier record."""
    from medgen.jobs.manifest import MANIFEST_FILE, archive_manifest

    second_ns = 1_700_000_000 * 10**9
    for run, offset_ns in enumerate((1_000, 2_000)):
        (tmp_path / MANIFEST_FILE).write_text(json.dumps({"run": run}))
        os.utime(tmp_path / MANIFEST_FILE, ns=(second_ns + offset_ns, second_ns + offset_ns))
        archive_manifest(tmp_path)
    archived = sorted((tmp_path / "manifests").iterdir())
    assert [json.loads(path.read_text())["run"] for path in archived] == [0, 1]


def test_write_job_records_inputs_as_absolute_paths(tmp_path, input_volume, monkeypatch):
    """Relative inputs are taken from the caller's folder; the worker, which reads them from the job folder, must get
    them absolute."""
    monkeypatch.chdir(tmp_path)
    job_dir = write_job(tmp_path / "jobs", "selftest", {"image": "in.nii.gz"}, {"steps": 1})
    assert json.loads((job_dir / JOB_FILE).read_text())["inputs"] == {"image": str(input_volume.resolve())}


@pytest.mark.parametrize(("kind", "inputs", "name"), [("selftest", {"image": ""}, "image"),
                                                     ("translate-train", {"volumes": ["in.nii.gz", ""]}, "volumes")],
                         ids=["path", "item of a list"])
def test_write_job_refuses_an_empty_input_path_instead_of_reading_the_current_folder(tmp_path, monkeypatch, kind,
                                                                                    inputs, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.nii.gz").write_bytes(b"")  # only the empty path is wrong
    with pytest.raises(BadInputError, match=name):
        write_job(tmp_path / "jobs", kind, inputs)
    assert not (tmp_path / "jobs").exists() or not any((tmp_path / "jobs").iterdir())


def test_jobs_written_in_the_same_second_get_their_own_folders(tmp_path, input_volume):
    job_dirs = [write_job(tmp_path / "jobs", "selftest", {"image": str(input_volume)}) for _ in range(3)]
    assert len(set(job_dirs)) == 3 and all((job_dir / JOB_FILE).is_file() for job_dir in job_dirs)


def test_extra_environment_variables_reach_the_worker(tmp_path):
    python = _fake_worker(tmp_path, "python-reporting-a-variable",
                          'echo "{\\"event\\": \\"result\\", \\"outputs\\": {}, \\"seen\\": \\"${MEDGEN_TEST_VALUE:-none}\\"}"\n')
    runner = JobRunner(tmp_path, python=python, env={"MEDGEN_TEST_VALUE": "given"}).start()
    assert runner.wait(timeout_s=30) == ExitCode.OK
    assert runner.result["seen"] == "given"


def test_json_lines_that_are_not_events_are_logged_as_text(tmp_path):
    """A library printing JSON of its own on stdout must not break the event stream."""
    python = _fake_worker(tmp_path, "python-printing-other-json",
                          "echo '{\"note\": 1}'\necho '[1, 2]'\necho '{\"event\": \"result\", \"outputs\": {}}'\n")
    runner = JobRunner(tmp_path, python=python).start()
    assert runner.wait(timeout_s=30) == ExitCode.OK and runner.result == {"event": "result", "outputs": {}}
    logged = [event["message"] for event in runner.events if event["event"] == "log" and event["level"] == "info"]
    assert logged == ['{"note": 1}', "[1, 2]"]


def test_wait_gives_up_after_its_timeout_and_the_job_keeps_running(tmp_path):
    python = _fake_worker(tmp_path, "python-running-long", "echo '{\"event\": \"started\"}'\nsleep 60\n")
    runner = JobRunner(tmp_path, python=python).start()
    try:
        with pytest.raises(TimeoutError, match="still running after 0.5 s"):
            runner.wait(timeout_s=0.5)
        assert runner.running and runner.returncode is None
    finally:
        _kill_process_group(runner)
