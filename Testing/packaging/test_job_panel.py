"""The shared job panel: Apply/Cancel, progress and status follow the job; results import once, on success."""

from __future__ import annotations

import types

import pytest

from slicer_stubs import slicer_gui_stubs


class FakeProgressBar:
    def __init__(self):
        self.minimum = self.maximum = self.value = 0

    def setRange(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def setValue(self, value):
        self.value = value


class ScriptedRunner:
    """A runner whose worker emits ``events`` one poll at a time, then exits with ``returncode``."""

    def __init__(self, events, returncode=0, result=None, error=None):
        self.pending = list(events)
        self.final_returncode, self.final_result, self.final_error = returncode, result, error
        self.on_event = None
        self.returncode = self.result = self.error = None
        self.cancelled = False

    def poll(self):
        if self.pending:
            self.on_event(self.pending.pop(0))
            return True
        self.returncode, self.result, self.error = self.final_returncode, self.final_result, self.final_error
        return False

    def cancel(self):
        self.cancelled = True
        self.pending.clear()
        self.final_returncode, self.final_error = 7, {"kind": "cancelled", "message": "Cancelled by the user."}


@pytest.fixture
def panel_module():
    with slicer_gui_stubs():
        from medgen.slicerqt import job_panel

        yield job_panel


@pytest.fixture
def widgets():
    return types.SimpleNamespace(
        apply=types.SimpleNamespace(text="Apply", enabled=False, toolTip=""),
        progress=FakeProgressBar(),
        status=types.SimpleNamespace(text=""),
        check=types.SimpleNamespace(enabled=True),
    )


def make_panel(panel_module, widgets):
    panel = panel_module.JobPanel(widgets.apply, widgets.progress, widgets.status, locked_while_busy=[widgets.check])
    panel.set_can_start(True)
    return panel


def track(panel, runner, imported):
    runner.on_event = panel.handle_event
    panel.track(runner, imported.append, "cpu")


def poll_until_idle(panel, limit=20):
    for _ in range(limit):
        if not panel.busy:
            return
        panel.poll()
    raise AssertionError("the panel never left the busy state")


def test_apply_becomes_cancel_while_running_and_progress_follows_events(panel_module, widgets):
    panel, imported = make_panel(panel_module, widgets), []
    events = [{"event": "progress", "phase": "smoothing", "step": 1, "total": 4, "eta_s": 75.0, "loss": 0.125}]
    track(panel, ScriptedRunner(events, result={"outputs": {"image": "x.nii.gz"}}), imported)
    assert panel.state is panel_module.JobState.RUNNING
    assert (widgets.apply.text, widgets.apply.enabled, widgets.check.enabled) == ("Cancel", True, False)
    panel.poll()
    assert (widgets.progress.maximum, widgets.progress.value) == (4, 1)
    assert widgets.status.text == "smoothing 1/4 | ETA 1m15s | loss 0.125 | device cpu"
    poll_until_idle(panel)
    assert imported == [{"outputs": {"image": "x.nii.gz"}}]
    assert panel.state is panel_module.JobState.IDLE
    assert (widgets.apply.text, widgets.apply.enabled, widgets.check.enabled) == ("Apply", True, True)
    assert widgets.status.text.startswith("Done")


@pytest.mark.parametrize("described, shown", [
    ({"device": "cpu", "type": "cpu", "name": "CPU", "threads": 2}, "device cpu"),
    ({"device": "cuda:1", "type": "cuda", "name": "NVIDIA H100 80GB HBM3", "total_memory_gib": 79.2}, "device cuda:1 (NVIDIA H100 80GB HBM3)"),
])
def test_the_status_names_the_device_the_worker_reports(panel_module, widgets, described, shown):
    """The worker's started event describes its device as a dictionary (medgen.devices.describe_device): the status
    line shows its short name, not the dictionary."""
    panel, imported = make_panel(panel_module, widgets), []
    events = [{"event": "started", "job_kind": "selftest", "device": described},
              {"event": "progress", "phase": "smoothing", "step": 1, "total": 4}]
    track(panel, ScriptedRunner(events, result={"outputs": {}}), imported)
    panel.poll()  # one event per poll
    panel.poll()
    assert widgets.status.text == f"smoothing 1/4 | {shown}"


def test_cancel_stops_the_runner_and_imports_nothing(panel_module, widgets):
    panel, imported = make_panel(panel_module, widgets), []
    runner = ScriptedRunner([{"event": "log", "message": "x"}] * 5)
    track(panel, runner, imported)
    panel.cancel()
    assert runner.cancelled and panel.state is panel_module.JobState.CANCELLING
    assert widgets.apply.enabled is False
    poll_until_idle(panel)
    assert imported == [] and widgets.status.text == "Cancelled."
    assert panel.state is panel_module.JobState.IDLE


def test_progress_that_arrives_while_cancelling_keeps_the_cancelling_status(panel_module, widgets):
    """Steps the worker finished before it saw the cancel must not overwrite "Cancelling..." or move the bar."""
    panel, imported = make_panel(panel_module, widgets), []
    runner = ScriptedRunner([{"event": "progress", "phase": "training", "step": 3, "total": 10}])
    runner.cancel = lambda: setattr(runner, "cancelled", True)  # the worker's last progress line is still on its way
    track(panel, runner, imported)
    panel.cancel()
    panel.poll()
    assert widgets.status.text == "Cancelling..." and widgets.progress.value != 3


def test_a_runner_that_fails_to_poll_ends_the_job_as_failed(panel_module, widgets):
    """A broken runner (its pipes gone) must not leave the timer firing and the panel busy for good."""
    panel, imported = make_panel(panel_module, widgets), []
    runner = ScriptedRunner([])

    def broken_poll():
        raise OSError("gone")

    runner.poll = broken_poll
    track(panel, runner, imported)
    panel.poll()
    assert panel.state is panel_module.JobState.FAILED and widgets.status.text == "Failed: gone"
    assert not panel.busy and imported == []


def test_a_job_that_finished_as_the_cancel_arrived_imports_its_results(panel_module, widgets):
    """The worker checks for a cancel between steps: one pressed while it wrote its outputs finds it done."""
    panel, imported = make_panel(panel_module, widgets), []
    result = {"event": "result", "outputs": {"image": "out.nii.gz"}}
    runner = ScriptedRunner([{"event": "log", "message": "writing"}], result=result)
    runner.cancel = lambda: setattr(runner, "cancelled", True)  # too late: the worker exits 0 with its result
    track(panel, runner, imported)
    panel.cancel()
    poll_until_idle(panel)
    assert imported == [result] and widgets.status.text.startswith("Done")


def test_worker_error_is_shown_and_the_panel_can_start_again(panel_module, widgets):
    panel, imported = make_panel(panel_module, widgets), []
    error = {"kind": "oom", "message": "Out of GPU memory: lower the patch size."}
    track(panel, ScriptedRunner([], returncode=4, error=error), imported)
    poll_until_idle(panel)
    assert panel.state is panel_module.JobState.FAILED
    assert widgets.status.text == "Failed: Out of GPU memory: lower the patch size."
    assert imported == [] and widgets.apply.text == "Apply" and widgets.apply.enabled


def test_an_import_that_raises_marks_the_job_failed(panel_module, widgets):
    panel = make_panel(panel_module, widgets)
    runner = ScriptedRunner([], result={"outputs": {}})
    runner.on_event = panel.handle_event

    def broken_import(result):
        raise KeyError("image")

    panel.track(runner, broken_import, "cpu")
    poll_until_idle(panel)
    assert panel.state is panel_module.JobState.FAILED
    assert widgets.status.text.startswith("Failed: Importing the results failed")


def test_a_second_job_is_refused_while_one_runs(panel_module, widgets):
    panel = make_panel(panel_module, widgets)
    track(panel, ScriptedRunner([{"event": "log"}]), [])
    with pytest.raises(RuntimeError, match="already running"):
        panel.track(ScriptedRunner([]), print, "cpu")


def test_apply_stays_disabled_until_inputs_allow_it(panel_module, widgets):
    panel = panel_module.JobPanel(widgets.apply, widgets.progress, widgets.status)
    assert widgets.apply.enabled is False
    panel.set_can_start(True)
    assert widgets.apply.enabled is True


@pytest.mark.parametrize("seconds, text", [(8, "8s"), (75.2, "1m15s"), (3700, "1h01m")])
def test_durations_read_naturally(panel_module, seconds, text):
    assert panel_module.format_duration(seconds) == text


def test_a_loss_plot_is_emptied_per_job_and_gets_every_loss(panel_module, widgets, mrml_scene):
    from medgen.slicer.plots import LossPlot

    plot = LossPlot(mrml_scene, refresh_interval_s=3600)
    panel = panel_module.JobPanel(widgets.apply, widgets.progress, widgets.status, loss_plot=plot)
    panel.set_can_start(True)
    plot.append(7, 9.0)  # left from an earlier run
    events = [{"event": "progress", "phase": "training", "step": step, "total": 3, "loss": 1.0 / step} for step in (1, 2, 3)]
    track(panel, ScriptedRunner(events, result={"outputs": {}}), [])
    assert plot.points() == ([], [])
    redraws = [0]
    plot.table_node.GetTable().AddObserver("ModifiedEvent", lambda caller, event: redraws.__setitem__(0, redraws[0] + 1))
    poll_until_idle(panel)
    assert plot.points() == ([1.0, 2.0, 3.0], [1.0, 0.5, 1.0 / 3])
    assert redraws == [1]  # throttled while running, drawn once when the job ended


def test_buttons_shared_by_panels_stay_locked_while_any_panel_is_busy(panel_module, widgets):
    """Check setup / Install dependencies are locked by every job panel of a module: an idle panel's update
    (e.g. its input check) must not unlock them while another panel's job runs."""
    lock = panel_module.BusyLock([widgets.check])
    other = types.SimpleNamespace(apply=types.SimpleNamespace(text="Train", enabled=False, toolTip=""),
                                  progress=FakeProgressBar(), status=types.SimpleNamespace(text=""))
    training = panel_module.JobPanel(other.apply, other.progress, other.status, lock)
    generating = panel_module.JobPanel(widgets.apply, widgets.progress, widgets.status, lock)
    runner = ScriptedRunner([{"event": "progress", "phase": "train", "step": 1, "total": 2}],
                            result={"event": "result", "outputs": {}})
    track(training, runner, [])
    assert not widgets.check.enabled
    generating.set_can_start(True)
    assert not widgets.check.enabled and widgets.apply.enabled
    poll_until_idle(training)
    assert widgets.check.enabled
