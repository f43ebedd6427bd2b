"""The README demo: every MedGen step on the offline sample subject, on CPU in minutes.

Steps so far: write the sample subject; run the ``selftest`` job through the worker (the same path
the Slicer modules use). Later capabilities append their own steps here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medgen.jobs.exit_codes import ExitCode


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(out_dir: Path, device: str = "auto", size: str = "small") -> int:
    from medgen.cli.main import _run_job_dir
    from medgen.data.samples import load_sample_case, write_sample_case
    from medgen.slicer.runner import write_job

    _say(f"writing the sample subject ({size} grid) to {out_dir / 'sample'}")
    _say("  t1 = real MNI152 T1 template; t2_simulated/pd_simulated = SIMULATED contrasts from its tissue maps")
    paths = write_sample_case(load_sample_case(size), out_dir / "sample")

    _say("step 1: selftest job (read volume -> torch on the chosen device -> write volume) through the worker")
    job_dir = write_job(out_dir / "jobs", "selftest", {"image": str(paths["t1"])}, {"steps": 10}, device=device)
    code = _run_job_dir(job_dir)
    if code != ExitCode.OK:
        _say(f"selftest failed with exit code {code}; see {job_dir / 'events.jsonl'}")
        return code
    _say(f"selftest output: {job_dir / 'outputs' / 'selftest.nii.gz'} (manifest: {job_dir / 'manifest.json'})")
    _say(f"done. Everything is under {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")))
