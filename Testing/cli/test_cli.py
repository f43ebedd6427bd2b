"""The ``medgen`` command line, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_bad_input_exit_code_and_message(tmp_path):
    result = _medgen("submit", "selftest", "--inputs", '{"image": "missing.nii.gz"}', "--job-root", str(tmp_path))
    assert result.returncode == 2
    assert "does not exist" in result.stderr
