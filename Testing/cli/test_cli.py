"""The ``medgen`` command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from monai.data import MetaTensor

from medgen.io import save_volume


def _medgen(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "medgen.cli.main", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_lists_the_commands():
    result = _medgen("--help")
    assert result.returncode == 0
    for command in ("run", "submit", "info", "sample-data", "demo"):
        assert command in result.stdout


def test_info_reports_versions_devices_and_job_kinds():
    result = _medgen("info")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["versions"]["torch"] == torch.__version__
    assert info["devices"][0]["type"] == "cpu"
    assert "selftest" in info["job_kinds"]


def test_info_of_one_kind_lists_its_inputs_and_parameters_with_defaults():
    result = _medgen("info", "maskgen")
    assert result.returncode == 0, result.stderr
    kind = json.loads(result.stdout)
    assert kind["kind"] == "maskgen" and "model" in kind["inputs"]["required"]
    assert kind["params"]["properties"]["candidates"]["default"] == 20 and "thresholds" in kind["params"]["properties"]
    unknown = _medgen("info", "maskgenn")
    assert unknown.returncode == 2 and "Unknown job kind 'maskgenn'. Known kinds: evaluate," in unknown.stderr


def test_submit_then_run_a_job_folder(tmp_path, oblique):
    image = save_volume(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), tmp_path / "in.nii.gz")
    result = _medgen("submit", "selftest", "--inputs", json.dumps({"image": str(image)}), "--params", '{"steps": 2}',
                     "--device", "cpu", "--job-root", str(tmp_path / "jobs"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["image"].endswith("selftest.nii.gz")
    assert "smoothing" in result.stderr  # the progress bar
    job_dir = next((tmp_path / "jobs").iterdir())
    rerun = _medgen("run", str(job_dir))
    assert rerun.returncode == 0, rerun.stderr
    assert _medgen("run", str(job_dir / "job.json")).returncode == 0  # the job's own file names its folder
    (tmp_path / "notes.txt").write_text("not a job")
    not_a_folder = _medgen("run", str(tmp_path / "notes.txt"))
    assert not_a_folder.returncode == 2 and "notes.txt is a file; medgen run takes a job folder" in not_a_folder.stderr


def test_bad_input_exit_code_and_message(tmp_path):
    result = _medgen("submit", "selftest", "--inputs", '{"image": "missing.nii.gz"}', "--job-root", str(tmp_path))
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_a_folder_the_file_system_refuses_is_bad_input_naming_it(tmp_path, monkeypatch, capsys):
    import errno

    from medgen.cli import main as cli

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(cli.Path, "mkdir", read_only)
    assert cli.main(["sample-data", str(tmp_path / "ro" / "sample"), "--size", "tiny"]) == 2
    assert f"medgen: Writing the files failed (Permission denied: {tmp_path / 'ro'}" in capsys.readouterr().err


def test_a_torchrun_launch_is_refused_before_any_job_is_written(tmp_path, monkeypatch):
    """Under torchrun every process would submit its own copy of the job (N single-process runs)."""
    from medgen.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["submit", "selftest", "--inputs", '{"image": "x.nii.gz"}', "--job-root", str(tmp_path)]) == 2
    assert list(tmp_path.iterdir()) == []


def test_errors_raised_in_the_command_itself_exit_with_their_kinds_code(tmp_path, monkeypatch):
    """export-nnunet runs in the CLI's own process: its errors follow the job exit codes too (oom 3, cancelled 4)."""
    from medgen.cli.main import main
    from medgen.errors import CancelledError, OutOfMemoryError
    from medgen.synthesis import nnunet_export

    (tmp_path / "labels.json").write_text('{"background": 0, "liver": 1}')
    (tmp_path / "pairs").mkdir()
    for error, code in ((OutOfMemoryError("out of memory"), 3), (CancelledError("stopped"), 4)):
        def failing_export(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(nnunet_export, "export_nnunet", failing_export)
        monkeypatch.setattr("medgen.synthesis.prepare.find_nnunet_pairs", lambda folder: [])
        argv = ["export-nnunet", str(tmp_path / "pairs"), str(tmp_path / "raw"), "--labels", str(tmp_path / "labels.json"),
                "--dataset-id", "7", "--name", "X"]
        assert main(argv) == code


def test_export_nnunet_says_which_cases_it_did_not_add_again(tmp_path, oblique, capsys):
    from medgen.cli.main import main

    (tmp_path / "labels.json").write_text('{"background": 0, "liver": 1}')
    for folder in ("imagesTr", "labelsTr"):
        (tmp_path / "pairs" / folder).mkdir(parents=True)
    label = torch.zeros(1, 8, 8, 8, dtype=torch.int64)
    label[0, 2:5, 2:5, 2:5] = 1
    save_volume(MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.from_numpy(oblique)), tmp_path / "pairs/imagesTr/a_0000.nii.gz")
    save_volume(MetaTensor(label, affine=torch.from_numpy(oblique)), tmp_path / "pairs/labelsTr/a.nii.gz", label=True)
    argv = ["export-nnunet", str(tmp_path / "pairs"), str(tmp_path / "raw"), "--labels", str(tmp_path / "labels.json"),
            "--dataset-id", "7", "--name", "X"]
    assert main(argv) == 0 and "warning" not in capsys.readouterr().err
    assert main(argv) == 0
    assert "[medgen] warning:" in capsys.readouterr().err  # the same case again: skipped, and said so


def test_demo_translation_step_says_it_is_a_tiny_cpu_model_and_prints_both_agreements(tmp_path, capsys):
    """The demo's translation step, shrunk (its real settings take about two minutes: see medgen.cli.demo)."""
    import re

    from medgen.cli.demo import _translation_step
    from medgen.io import load_volume

    assert _translation_step(tmp_path, "cpu", grid=[16, 16, 8], training_steps=2, sampling_steps=2) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    assert any("TINY 2.5D CPU model (2 steps on a 16x16x8 grid) on the real T1 only" in line for line in said)
    assert "SIMULATED PD -> T1 with a tiny CPU model" in said[-4]
    agreement = re.fullmatch(r"\[demo\] LMI agreement of the translation with its PD source (\S+) vs with an unrelated source (\S+)", said[-1])
    assert agreement and all(0.0 <= float(value) <= 1.0 for value in agreement.groups())
    source = load_volume(tmp_path / "translation" / "pd_simulated.nii.gz")
    translated = load_volume(next((tmp_path / "jobs").glob("translate-2*")) / "outputs" / "translated.nii.gz")
    assert translated.shape == source.shape and torch.allclose(translated.affine, source.affine, atol=1e-5)


def test_demo_mask_synthesis_step_reports_every_mask(tmp_path, capsys):
    """The demo's mask-conditioned step, shrunk (its real settings take a couple of minutes: see medgen.cli.demo)."""
    import json
    import re

    from medgen.cli.demo import _mask_synthesis_step

    assert _mask_synthesis_step(tmp_path, "cpu", grid=[16, 16, 16], stage_steps=2, checker_steps=2, candidates=2) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo]")]
    assert any("TINY CPU model (2 steps per stage on a 16x16x16 grid)" in line for line in said)
    verdicts = [re.fullmatch(r"\[demo\]   mask (\S+): (\d) of 2 candidates accepted \((.+); best checker IoU (\S+)\)", line) for line in said]
    verdicts = [match for match in verdicts if match]
    assert [match.group(1) for match in verdicts] == ["mask_5", "mask_6"]
    report = json.loads(next((tmp_path / "jobs").glob("maskgen-2*/outputs/report.json")).read_text())
    assert [len(mask["candidates"]) for mask in report["masks"]] == [2, 2]
    assert all(0.0 <= float(match.group(4)) <= 1.0 for match in verdicts)


def _slow_selftest_under_way(tmp_path, oblique):
    """A ``medgen submit`` of a slow selftest, once its worker reports progress: ``(command, its worker processes)``."""
    import time

    import psutil

    image = save_volume(MetaTensor(torch.rand(1, 16, 16, 16), affine=torch.from_numpy(oblique)), tmp_path / "in.nii.gz")
    command = subprocess.Popen(
        [sys.executable, "-m", "medgen.cli.main", "submit", "selftest", "--inputs", json.dumps({"image": str(image)}),
         "--params", '{"steps": 500, "step_delay_s": 0.05}', "--device", "cpu", "--job-root", str(tmp_path / "jobs")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "jobs").glob("*/events.jsonl")) or "progress" not in next((tmp_path / "jobs").glob("*/events.jsonl")).read_text():
        assert time.monotonic() < deadline and command.poll() is None
        time.sleep(0.1)
    return command, psutil.Process(command.pid).children(recursive=True)


def test_a_sigterm_to_the_command_cancels_its_worker(tmp_path, oblique):
    """The worker runs in its own session, so a SIGTERM for the command (timeout, a batch scheduler) never reached
    it: it ran on unwatched and died on a broken pipe, recorded as an internal error."""
    import signal

    import psutil

    command, workers = _slow_selftest_under_way(tmp_path, oblique)
    command.send_signal(signal.SIGTERM)
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 4 and "Traceback" not in stderr, stderr
    assert workers and not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)
    assert json.loads(next((tmp_path / "jobs").glob("*/manifest.json")).read_text())["status"] == "cancelled"


def test_ctrl_c_twice_still_stops_the_worker_before_the_command_ends(tmp_path, oblique):
    import signal
    import time

    import psutil

    command, workers = _slow_selftest_under_way(tmp_path, oblique)
    command.send_signal(signal.SIGINT)
    time.sleep(0.2)
    command.send_signal(signal.SIGINT)  # an impatient second Ctrl+C
    _, stderr = command.communicate(timeout=60)
    assert command.returncode == 4 and "Traceback" not in stderr, stderr
    assert workers and not any(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE for worker in workers)


def test_the_terminal_names_the_device_a_job_started_on():
    """The started event's device dictionary becomes a short name: the GPU's model for CUDA, the device alone for CPU."""
    import io

    from medgen.cli.progress_view import TerminalEventView

    stream = io.StringIO()
    view = TerminalEventView(stream)
    view({"event": "started", "job_kind": "translate", "device": {"device": "cuda:0", "type": "cuda", "name": "NVIDIA H100"}})
    view({"event": "started", "job_kind": "translate", "device": {"device": "cpu", "type": "cpu", "name": "CPU", "threads": 2}})
    assert stream.getvalue().splitlines() == ["[medgen] translate job started on cuda:0 (NVIDIA H100)",
                                              "[medgen] translate job started on cpu"]


@pytest.mark.parametrize("argv, kind, expected_inputs, expected_params", [
    (["synth-train", "data", "--shape", "16", "16", "8", "--vae-steps", "7", "--ldm-steps", "9"], "synth-train",
     {"folder": "data"}, {"shape": [16, 16, 8], "vae_phase1_steps": 7, "ldm_steps": 9, "preset": "tiny"}),
    (["synthesize", "model", "--count", "3", "--nnunet-id", "501"], "synthesize",
     {"model": "model"}, {"count": 3, "nnunet_dataset_id": 501, "steps": 100}),
    (["maskgen-train", "--source-images", "s.nii.gz", "--source-labels", "l.nii.gz", "--target-images", "t.nii.gz",
      "--source-modality", "T1", "--target-modality", "T2", "--flip-axes", "0", "2", "--encoding", "merged"], "maskgen-train",
     {"source_images": ["s.nii.gz"], "source_labels": ["l.nii.gz"], "target_images": ["t.nii.gz"]},
     {"source_modality": "T1", "target_modality": "T2", "encoding": "merged", "controlnet_flip_axes": [0, 2], "unet_flip_axes": [0, 2]}),
    (["maskgen", "model", "m.nii.gz", "--target-modality", "T2", "--candidates", "6", "--guidance-scale", "3"], "maskgen",
     {"model": "model", "masks": ["m.nii.gz"]}, {"target_modality": "T2", "candidates": 6, "guidance_scale": 3.0}),
    (["translate-train", "a.nii.gz", "--mode", "3d", "--steps", "5"], "translate-train",
     {"volumes": ["a.nii.gz"]}, {"mode": "3d", "steps": 5, "conditioned": True, "lmi_compat": False}),
    (["translate-train", "a.nii.gz", "--unconditional", "--lmi-compat"], "translate-train",
     {"volumes": ["a.nii.gz"]}, {"conditioned": False, "lmi_compat": True}),
    (["translate", "pd.nii.gz", "model", "--sampler", "ddim", "--steps", "50", "--eta", "0", "--memory-budget-mb", "256"], "translate",
     {"source": "pd.nii.gz", "model": "model"}, {"sampler": "ddim", "steps": 50, "eta": 0.0, "memory_budget_mb": 256.0}),
    (["synth-train", "data", "--spacing-mm", "1", "1", "2.5"], "synth-train", {"folder": "data"}, {"spacing_mm": [1.0, 1.0, 2.5]}),
    (["maskgen", "model", "m.nii.gz", "--target-modality", "T2", "--checker", "checker", "--conditioning-scale", "1.5"], "maskgen",
     {"checker": "checker"}, {"conditioning_scale": 1.5, "guidance_scale": 7.0}),
    (["translate", "pd.nii.gz", "model", "--sdedit-start", "300"], "translate", {"source": "pd.nii.gz"}, {"sdedit_start": 300}),
], ids=lambda value: value if isinstance(value, str) else None)
def test_each_command_maps_its_options_to_the_job_parameters(monkeypatch, argv, kind, expected_inputs, expected_params):
    """What each command writes into its job (options to parameters, e.g. --unconditional to conditioned false, one
    --flip-axes to both stages), and every parameter it writes is one its job kind declares."""
    from medgen.cli import main as cli
    from medgen.jobs.kinds import get_kind

    submitted = []
    monkeypatch.setattr(cli, "_submit", lambda *job: submitted.append(job[:3]) or 0)
    assert cli.main(argv) == 0
    ((submitted_kind, inputs, params),) = submitted
    assert submitted_kind == kind
    assert {key: inputs[key] for key in expected_inputs} == expected_inputs
    assert {key: params[key] for key in expected_params} == expected_params
    declared = get_kind(kind).params["properties"]
    assert set(params) <= set(declared), sorted(set(params) - set(declared))


def test_ctrl_c_cancels_the_job_and_waits_for_the_worker(monkeypatch, tmp_path, capsys):
    """The first Ctrl+C cancels and then waits for the worker's own exit code (the wait enforces the kill deadline;
    returning at once would orphan it, and a job that had just finished would be called cancelled)."""
    from medgen.cli import main as cli
    from medgen.slicer import runner as runner_module

    calls = []

    class InterruptedRunner:
        result, error = {"outputs": {"image": "x.nii.gz"}}, None

        def __init__(self, job_dir, on_event=None):
            pass

        def start(self):
            return self

        def wait(self):
            calls.append("wait")
            if calls.count("wait") == 1:
                raise KeyboardInterrupt
            return 0  # it had finished as the cancel came

        def cancel(self):
            calls.append("cancel")

    monkeypatch.setattr(runner_module, "JobRunner", InterruptedRunner)
    assert cli._run_job_dir(tmp_path) == 0
    assert calls == ["wait", "cancel", "wait"]
    assert json.loads(capsys.readouterr().out) == {"image": "x.nii.gz"}


def test_the_demo_stops_at_the_first_failing_step_with_its_exit_code(tmp_path, monkeypatch, capsys):
    """A failed setup check ends the demo with its code instead of starting minutes of training on a broken setup."""
    from medgen.cli import demo
    from medgen.cli import main as cli

    later_steps = []
    monkeypatch.setattr(cli, "_run_job_dir", lambda job_dir, verbose=False: 2)
    for step in ("_adaptation_step", "_paired_synthesis_step", "_translation_step", "_mask_synthesis_step"):
        monkeypatch.setattr(demo, step, lambda *args, step=step: later_steps.append(step) or 0)
    assert demo.run_demo(tmp_path) == 2
    assert later_steps == [] and "selftest failed with exit code 2" in capsys.readouterr().out


def test_a_command_writes_a_job_its_kind_accepts_with_the_seed_and_device_given(monkeypatch, tmp_path):
    """Options left out are left out of job.json (the kind's defaults apply; a null would be refused), and the job
    options reach it."""
    from medgen.cli import main as cli

    (tmp_path / "data").mkdir()
    ran = []
    monkeypatch.setattr(cli, "_run_job_dir", lambda job_dir, verbose=False: ran.append(job_dir) or 0)
    assert cli.main(["synth-train", str(tmp_path / "data"), "--seed", "5", "--device", "cpu", "--job-root", str(tmp_path / "jobs")]) == 0
    (job_dir,) = ran
    job = json.loads((job_dir / "job.json").read_text())
    assert (job["seed"], job["device"]) == (5, "cpu") and job["inputs"] == {"folder": str((tmp_path / "data").resolve())}
    assert job["params"] == {"shape": [32, 32, 32], "preset": "tiny"}


def test_the_ctrl_c_handler_is_given_back_when_the_job_ends(monkeypatch, tmp_path, capsys):
    """After a job (the demo runs several, then goes on), Ctrl+C behaves as before it: a later one is not swallowed."""
    import signal

    from medgen.cli import main as cli
    from medgen.slicer import runner as runner_module

    class FinishedRunner:
        result, error = {"outputs": {}}, None

        def __init__(self, job_dir, on_event=None):
            pass

        def start(self):
            return self

        def wait(self):
            return 0

    monkeypatch.setattr(runner_module, "JobRunner", FinishedRunner)
    before = [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    assert cli._run_job_dir(tmp_path) == 0
    assert [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == before


def test_the_terminal_shows_warnings_and_errors_and_hides_routine_logs_unless_verbose():
    import io

    from medgen.cli.progress_view import TerminalEventView

    quiet, verbose = io.StringIO(), io.StringIO()
    for stream, is_verbose in ((quiet, False), (verbose, True)):
        view = TerminalEventView(stream, verbose=is_verbose)
        for level in ("info", "warning", "error"):
            view({"event": "log", "level": level, "message": f"a {level} line"})
    assert quiet.getvalue().splitlines() == ["[warning] a warning line", "[error] a error line"]
    assert verbose.getvalue().splitlines() == ["[info] a info line", "[warning] a warning line", "[error] a error line"]


def test_the_terminal_shows_one_bar_per_phase_counting_its_steps():
    import io
    import re

    from medgen.cli.progress_view import TerminalEventView

    stream = io.StringIO()
    view = TerminalEventView(stream)
    for phase, total in (("vae", 2), ("ldm", 3)):
        for step in range(1, total + 1):
            view({"event": "progress", "phase": phase, "step": step, "total": total, "eta_s": None, "loss": 0.5})
    view({"event": "result", "outputs": {}})
    final = {}
    for phase, done, total in re.findall(r"(\w+): +\d+%\|[^|]*\| (\d+)/(\d+)", stream.getvalue()):
        final[phase] = (int(done), int(total))
    assert final == {"vae": (2, 2), "ldm": (3, 3)}


def test_the_demo_stops_when_the_adaptation_step_fails(tmp_path, monkeypatch, capsys):
    from medgen.cli import demo
    from medgen.cli import main as cli

    later_steps = []
    monkeypatch.setattr(cli, "_run_job_dir", lambda job_dir, verbose=False: 0)  # the selftest passes
    monkeypatch.setattr(demo, "_adaptation_step", lambda *args: 3)
    for step in ("_paired_synthesis_step", "_translation_step", "_mask_synthesis_step"):
        monkeypatch.setattr(demo, step, lambda *args, step=step: later_steps.append(step) or 0)
    assert demo.run_demo(tmp_path) == 3
    assert later_steps == [] and "done." not in capsys.readouterr().out
