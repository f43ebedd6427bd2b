"""Progress events of nested loops (denoising steps inside candidates inside masks) and ETAs, on a fake clock."""

from __future__ import annotations

import json

import pytest

import medgen.jobs.events as events_module
import medgen.progress as progress_module
from medgen.jobs.events import EventStream, JobReporter
from medgen.progress import EtaClock


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "monotonic", fake)
    monkeypatch.setattr(events_module.time, "monotonic", fake)
    return fake


class Lines:
    def __init__(self) -> None:
        self.events = []

    def write(self, text: str) -> None:
        self.events.append(json.loads(text))

    def flush(self) -> None:
        pass


def test_outer_loops_keep_their_progress_and_eta_between_fast_inner_steps(clock):
    lines = Lines()
    reporter = JobReporter(EventStream(lines), cancel=type("Never", (), {"requested": False})())
    for mask in range(1, 3):
        for candidate in range(1, 5):
            for step in range(1, 11):
                clock.now += 0.05
                reporter.progress("denoising", step, 10)
            reporter.progress("candidates", candidate, 4)
        reporter.progress("masks", mask, 2)
    outer = [(event["phase"], event["step"], event["eta_s"]) for event in lines.events if event["phase"] != "denoising"]
    assert [(phase, step) for phase, step, _ in outer] == [
        ("candidates", 1), ("candidates", 2), ("candidates", 3), ("candidates", 4), ("masks", 1),
        ("candidates", 1), ("candidates", 2), ("candidates", 3), ("candidates", 4), ("masks", 2)]
    assert outer[1][2] == pytest.approx(1.0) and outer[6][2] == pytest.approx(1.0)  # 0.5 s per candidate, 2 to go
    assert outer[9][2] == 0.0
    denoising = [event for event in lines.events if event["phase"] == "denoising"]
    assert len(denoising) < 40 and all(event["step"] == 10 or event["eta_s"] is not None for event in denoising[1:])


def test_a_phase_that_starts_again_gets_a_fresh_estimate(clock):
    eta = EtaClock()
    for step in range(1, 11):  # a first run at 10 s per step
        clock.now += 10.0
        eta.eta_s("training", step, 10)
    clock.now += 0.1
    assert eta.eta_s("training", 1, 100) is None  # a new run under the same name
    clock.now += 0.1
    assert eta.eta_s("training", 2, 100) == pytest.approx(9.8)


def test_a_phase_repeating_its_step_restarts_its_clock(clock):
    """A step that does not advance (the same step number again: a new outer item under the same phase name) starts a
    fresh estimate instead of dividing the time since the first run's start by the steps of both."""
    eta = EtaClock()
    eta.eta_s("denoising", 1, 10)
    clock.now += 10.0
    assert eta.eta_s("denoising", 2, 10) == pytest.approx(80.0)
    clock.now += 0.5
    assert eta.eta_s("denoising", 2, 10) is None  # the same step again: a new item
    clock.now += 1.0
    assert eta.eta_s("denoising", 3, 10) == pytest.approx(7.0)  # 1 s per step of the new item, 7 to go


def test_a_phase_reporter_renames_the_phase_and_counts_against_its_total():
    """A training run in segments (up to each validation) shows the whole run's length under the stage's name."""
    from medgen.progress import CallbackReporter, PhaseReporter

    events = []
    PhaseReporter(CallbackReporter(events.append), "vae", total=10).progress("training", 3, 4, loss=0.5)
    PhaseReporter(CallbackReporter(events.append), "ldm").progress("training", 3, 4)
    assert [(e["phase"], e["step"], e["total"]) for e in events] == [("vae", 3, 10), ("ldm", 3, 4)]
    assert events[0]["loss"] == 0.5


def test_events_are_strict_json_with_nan_and_infinite_metrics_as_null():
    """A diverging loss (NaN, inf) must not write 'NaN' into the event stream: strict JSON readers (Slicer's Qt
    JSON, browsers, jq) reject it."""
    import io
    import math

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    buffer = io.StringIO()
    EventStream(buffer).emit("progress", phase="training", step=1, total=2, loss=math.nan,
                             metrics={"grad_norm": math.inf, "lr": [1e-4, -math.inf]})
    event = json.loads(buffer.getvalue(), parse_constant=refuse)
    assert event["loss"] is None and event["metrics"] == {"grad_norm": None, "lr": [1e-4, None]}


def test_the_cancel_file_alone_stops_the_job(tmp_path):
    """Cancel works without signals (Windows, a worker started by another user, a job folder on a shared disk):
    ``JOB_DIR/cancel`` makes the next ``check_cancelled`` raise."""
    import signal

    from medgen.errors import CancelledError
    from medgen.jobs.events import CANCEL_FILE, CancelWatch

    handler = signal.getsignal(signal.SIGTERM)
    try:
        reporter = JobReporter(EventStream(Lines()), CancelWatch(tmp_path))
        reporter.check_cancelled()
        (tmp_path / CANCEL_FILE).touch()
        with pytest.raises(CancelledError, match="^Cancelled"):
            reporter.check_cancelled()
    finally:
        signal.signal(signal.SIGTERM, handler)  # CancelWatch installs the worker's handler


def test_the_time_stamp_is_never_replaced_by_a_field():
    """A handler's result is emitted as fields of the result event: a 'time' of its own (a duration) must not move
    the event's stamp."""
    import time

    lines = Lines()
    before = time.time()
    EventStream(lines).emit("result", time=12.5, outputs={})
    (event,) = lines.events
    assert event["time"] >= round(before, 3) - 0.001 and event["outputs"] == {}


def test_a_field_named_event_neither_fails_nor_changes_the_event_type():
    """A job's result dict is emitted as fields: a key "event" of its own must not break or relabel the result."""
    lines = Lines()
    EventStream(lines).emit("result", event="their own", outputs={})
    (event,) = lines.events
    assert event["event"] == "result" and event["outputs"] == {}


def test_each_event_reaches_the_reader_at_once():
    """The runner reads events from a pipe while the job runs: every event is flushed, not left in a buffer."""
    import io

    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, encoding="utf-8")  # holds what it is given until flushed
    EventStream(text).emit("progress", phase="training", step=1, total=2)
    assert json.loads(raw.getvalue())["phase"] == "training"


def test_the_job_folders_event_log_is_written_as_events_happen(tmp_path):
    """events.jsonl is read while the job runs (the CLI's tests, a user tailing it): no event waits for the close."""
    from medgen.jobs.events import EVENTS_FILE

    stream = EventStream(Lines())
    stream.keep_copy_in(tmp_path)
    try:
        stream.emit("progress", phase="training", step=1, total=2)
        (logged,) = [json.loads(line) for line in (tmp_path / EVENTS_FILE).read_text().splitlines()]
        assert logged["event"] == "progress" and logged["step"] == 1
    finally:
        stream.close()


def test_an_event_log_that_cannot_be_written_stops_only_the_copy(tmp_path):
    """A full disk under the job folder ends the events.jsonl copy; the events still reach the runner."""
    from medgen.jobs.events import EVENTS_FILE

    (tmp_path / EVENTS_FILE).symlink_to("/dev/full")  # every write fails with ENOSPC
    lines = Lines()
    stream = EventStream(lines)
    stream.keep_copy_in(tmp_path)
    stream.emit("started", job_kind="selftest")
    stream.emit("progress", phase="smoothing", step=1, total=1)
    stream.close()
    assert [event["event"] for event in lines.events] == ["started", "progress"]
