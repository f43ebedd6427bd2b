"""The worker process: ``python -m medgen.worker JOB_DIR``.

Validates the job before any work, runs its handler, streams events, writes ``manifest.json`` and
exits with the code of the outcome. A bad ``job.json`` writes nothing into the job folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

from medgen.errors import MedGenError, cannot_write_message, is_out_of_memory
from medgen.jobs.events import CancelWatch, EventStream, JobReporter
from medgen.jobs.exit_codes import EXIT_CODE_OF_KIND, ExitCode

#: file-system failures the user can act on (read-only folder, no permission, disk or quota full, file too large)
OOM_ADVICE = (
    "Out of memory. Try a smaller patch size or batch size, enable mixed precision (AMP), "
    "lower the memory budget option, or run on a device with more memory."
)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


#: packages ``import monai`` pulls in for features MedGen never calls (plots, data frames, scikit-learn metrics)
UNUSED_BY_MEDGEN = ("matplotlib", "pandas", "sklearn")


def _skip_unused_imports(kind_name: str) -> None:
    """Import MONAI without the packages it loads for features no MedGen job uses.

    MONAI imports all its submodules at ``import monai``; through its optional imports they load matplotlib,
    pandas and scikit-learn (measured: 2.8 s -> 2.1 s and 401 -> 327 MB for torch + MONAI), and its TransChex
    network imports Hugging Face ``transformers`` whenever that is installed (as a dependency of HF peft; 45 %
    of the worker's import time). Marked absent while MONAI is imported, they count as unavailable to MONAI's
    ``optional_import``. The marks of the three are removed afterwards; ``transformers`` stays absent unless
    the job kind needs it (HF peft baselines).
    """
    from medgen.jobs.kinds import get_kind

    if not get_kind(kind_name).uses_hf_transformers and "transformers" not in sys.modules:
        sys.modules["transformers"] = None  # type: ignore[assignment]
    if "monai" in sys.modules:
        return
    blocked = [name for name in UNUSED_BY_MEDGEN if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        import monai  # noqa: F401
    finally:
        for name in blocked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


class _WarningsToEvents(logging.Handler):
    """Warnings the library logs on the ``medgen`` logger (e.g. a NIfTI whose sform and qform disagree) become
    ``log`` events, so the panel, the CLI and ``events.jsonl`` show them."""

    def __init__(self, events: EventStream) -> None:
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.emit("log", level=record.levelname.lower(), message=record.getMessage())
        except Exception:  # noqa: BLE001 - a closed stream must not fail the library call that logged
            self.handleError(record)


def run_job(job_dir: Path, events: EventStream) -> ExitCode:
    """Run the job in ``job_dir``, reporting through ``events``; returns the exit code."""
    started_s = time.monotonic()
    spec = None
    status = {"status": "internal"}
    held = contextlib.ExitStack()
    owns_folder = False
    library_log, to_events = logging.getLogger("medgen"), _WarningsToEvents(events)
    library_log.addHandler(to_events)
    held.callback(library_log.removeHandler, to_events)
    try:
        from medgen.io.folder_lock import exclusive_folder
        from medgen.jobs.context import set_aside_outputs
        from medgen.jobs.kinds import get_kind
        from medgen.jobs.manifest import archive_manifest
        from medgen.jobs.spec import load_job

        spec = load_job(job_dir)
        _refuse_planted_links(job_dir)
        held.enter_context(exclusive_folder(job_dir, "job folder"))  # a second run of this folder is refused
        owns_folder = True
        archived = archive_manifest(job_dir)  # an earlier run's manifest stays with the outputs it describes
        if not get_kind(spec.kind).resumes:
            set_aside_outputs(job_dir, archived)
        _skip_unused_imports(spec.kind)
        events.keep_copy_in(job_dir)
        reporter = JobReporter(events, CancelWatch(job_dir))
        return _run_validated(job_dir, spec, events, reporter, status, started_s)
    except MedGenError as error:
        return _fail(events, error.kind, str(error), status)
    except BaseException as error:  # noqa: BLE001 - every failure must become an event and an exit code
        if isinstance(error, KeyboardInterrupt):
            return _fail(events, "cancelled", "Interrupted.", status)
        if (message := cannot_write_message(error)) is not None:
            return _fail(events, "bad_input", message, status)
        if is_out_of_memory(error):
            return _fail(events, "oom", f"{OOM_ADVICE} ({type(error).__name__}: {str(error)[:300]})", status)
        events.emit("log", level="error", message=traceback.format_exc())
        return _fail(events, "internal", f"Internal error: {type(error).__name__}: {error}", status)
    finally:
        if spec is not None and owns_folder:  # only the run holding the folder writes its manifest
            _write_manifest(job_dir, spec, status, started_s, events)
        events.close()
        held.close()


def _refuse_planted_links(job_dir: Path) -> None:
    """A job folder from elsewhere could hold links that send the worker's writes outside it (outputs/ to a folder
    of results, events.jsonl to a file that would be appended to): refuse to run in it."""
    from medgen.errors import BadInputError
    from medgen.io.folder_lock import LOCK_FILE
    from medgen.jobs.context import EARLIER_OUTPUTS_DIR, OUTPUTS_DIR
    from medgen.jobs.events import CANCEL_FILE, EVENTS_FILE
    from medgen.jobs.manifest import ARCHIVE_DIR, MANIFEST_FILE

    names = (OUTPUTS_DIR, EARLIER_OUTPUTS_DIR, EVENTS_FILE, CANCEL_FILE, MANIFEST_FILE, ARCHIVE_DIR, LOCK_FILE)
    links = [name for name in names if (job_dir / name).is_symlink()]
    if links:
        raise BadInputError(f"The job folder {job_dir} holds symbolic links {links}, which would send the job's writes "
                            "elsewhere. Run jobs in folders written by medgen (medgen submit, write_job).")


def _write_manifest(job_dir: Path, spec, status: dict, started_s: float, events: EventStream) -> None:
    """Write the manifest; a failure to write it (full disk, read-only folder) is logged and never replaces the
    job's own outcome."""
    from medgen.jobs.manifest import write_manifest

    try:
        write_manifest(
            job_dir, kind=spec.kind, seed=spec.seed, params=spec.params, inputs=spec.inputs,
            device_requested=spec.device, timings_s={"total": round(time.monotonic() - started_s, 3)}, **status,
        )
    except OSError as error:
        events.emit("log", level="error", message=f"The job's manifest could not be written: {error}")


def _run_validated(job_dir, spec, events, reporter, status, started_s) -> ExitCode:
    from medgen.devices import describe_device, select_device
    from medgen.jobs.context import JobContext
    from medgen.jobs.kinds import get_kind

    device = select_device(spec.device)
    _seed_everything(spec.seed)
    device_info = describe_device(device)
    status["device"] = device_info
    events.emit("started", job_kind=spec.kind, job_dir=str(job_dir), pid=os.getpid(), device=device_info)
    context = JobContext(job_dir=job_dir, spec=spec, device=device, reporter=reporter)
    result = get_kind(spec.kind).load_handler()(context)
    status.update(status="ok", outputs=result.get("outputs", {}), handler_timings_s=context.timings_s)
    events.emit("result", elapsed_s=round(time.monotonic() - started_s, 3), **result)
    return ExitCode.OK


def _fail(events: EventStream, kind: str, message: str, status: dict) -> ExitCode:
    status.update(status=kind, message=message)
    events.emit("error", kind=kind, message=message)
    return EXIT_CODE_OF_KIND.get(kind, ExitCode.INTERNAL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medgen.worker", description="Run one MedGen job folder.")
    parser.add_argument("job_dir", type=Path, help="folder holding job.json")
    args = parser.parse_args(argv)
    return int(run_job(args.job_dir.resolve(), EventStream()))


if __name__ == "__main__":
    sys.exit(main())
