"""``medgen`` command line entry point.

Commands that do heavy work write a job folder and run it through the worker (exactly the path the
Slicer modules use), showing progress bars; ``Ctrl+C`` cancels the job cleanly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medgen.errors import MedGenError
from medgen.jobs.exit_codes import ExitCode


def _run_job_dir(job_dir: Path, verbose: bool = False) -> int:
    from medgen.cli.progress_view import TerminalEventView
    from medgen.slicer.runner import JobRunner

    view = TerminalEventView(verbose=verbose)
    runner = JobRunner(job_dir, on_event=view).start()
    try:
        code = runner.wait()
    except KeyboardInterrupt:
        print("\n[medgen] cancelling...", file=sys.stderr)
        runner.cancel()
        code = runner.wait()
    view.close()
    if runner.result:
        print(json.dumps(runner.result.get("outputs", {}), indent=2))
    if runner.error:
        print(f"[medgen] {runner.error['kind']}: {runner.error['message']}", file=sys.stderr)
    return code


def cmd_run(args) -> int:
    return _run_job_dir(args.job_dir.resolve(), args.verbose)


def cmd_submit(args) -> int:
    """Write a job folder for ``kind`` from JSON inputs/params and run it."""
    from medgen.slicer.runner import write_job

    job_dir = write_job(args.job_root, args.kind, json.loads(args.inputs), json.loads(args.params), args.device, args.seed)
    print(f"[medgen] job folder: {job_dir}", file=sys.stderr)
    return _run_job_dir(job_dir, args.verbose)


def cmd_info(args) -> int:
    import medgen
    from medgen.devices import cuda_usable, describe_device, select_device
    from medgen.jobs.kinds import known_kinds
    from medgen.jobs.manifest import package_versions

    import torch

    devices = [describe_device(select_device("cpu"))]
    if cuda_usable():
        devices += [describe_device(torch.device(f"cuda:{i}")) for i in range(torch.cuda.device_count())]
    info = {
        "medgen": medgen.__version__,
        "versions": package_versions(),
        "cuda_usable": cuda_usable(),
        "devices": devices,
        "job_kinds": {kind.name: kind.summary for kind in known_kinds()},
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_sample_data(args) -> int:
    from medgen.data.samples import load_sample_case, write_sample_case

    paths = write_sample_case(load_sample_case(args.size, seed=args.seed), args.out)
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from medgen.cli.demo import run_demo

    return run_demo(args.out.resolve(), device=args.device, size=args.size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgen", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the worker's log lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a job folder (holding job.json) with progress bars")
    run.add_argument("job_dir", type=Path)
    run.set_defaults(func=cmd_run)

    submit = commands.add_parser("submit", help="write a job folder for a job kind and run it")
    submit.add_argument("kind", help="job kind (see 'medgen info')")
    submit.add_argument("--inputs", default="{}", help='JSON object, e.g. \'{"image": "t1.nii.gz"}\'')
    submit.add_argument("--params", default="{}", help="JSON object of the kind's parameters")
    submit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    submit.add_argument("--seed", type=int, default=0)
    submit.add_argument("--job-root", type=Path, default=Path("medgen_jobs"))
    submit.set_defaults(func=cmd_submit)

    info = commands.add_parser("info", help="versions, devices, GPU memory and job kinds")
    info.set_defaults(func=cmd_info)

    samples = commands.add_parser("sample-data", help="write the offline sample subject (MNI152 + simulated contrasts)")
    samples.add_argument("out", type=Path)
    samples.add_argument("--size", default="reduced", choices=["full", "reduced", "small", "tiny"])
    samples.add_argument("--seed", type=int, default=0)
    samples.set_defaults(func=cmd_sample_data)

    demo = commands.add_parser("demo", help="run the demo pipeline on the sample data")
    demo.add_argument("--out", type=Path, default=Path("demo_output"))
    demo.add_argument("--device", default="auto")
    demo.add_argument("--size", default="small", choices=["reduced", "small", "tiny"])
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except MedGenError as error:
        print(f"medgen: {error}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT if error.kind == "bad_input" else ExitCode.INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
