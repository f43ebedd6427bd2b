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
