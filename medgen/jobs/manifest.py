"""``manifest.json``: what produced a job's outputs (versions, device, seed, parameters, timings)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from medgen.io.atomic import ensure_folder, write_text_atomic

MANIFEST_FILE = "manifest.json"
#: where earlier runs' manifests of a job folder run again go
ARCHIVE_DIR = "manifests"
#: triton too: whether the LMI map runs the fused kernel (and with which compiler) depends on it
_RECORDED_PACKAGES = ("medgen", "torch", "triton", "monai", "numpy", "SimpleITK", "nibabel", "safetensors", "peft")


def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape MedGen's results (None when absent).

    A package this process has imported reports the version it was built as (``torch.__version__`` names the
    build, e.g. "2.11.0+cu130", where the wheel's metadata of a PyPI CUDA build says only "2.11.0"); the others
    are read from the installed metadata without importing them.
    """
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _RECORDED_PACKAGES:
        loaded = getattr(sys.modules.get(name), "__version__", None)
        try:
            versions[name] = str(loaded) if loaded is not None else importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_manifest(job_dir: Path, **fields: Any) -> Path:
    """Write ``JOB_DIR/manifest.json`` atomically with versions, platform and the given fields."""
    document = {"versions": package_versions(), "platform": platform.platform(), **fields}
    return write_text_atomic(job_dir / MANIFEST_FILE, json.dumps(document, indent=2, default=str) + "\n")


def archive_manifest(job_dir: Path) -> Path | None:
    """Move an earlier run's ``manifest.json`` to ``JOB_DIR/manifests/<its time>.json`` before a new run of the
    folder writes its own, so a failed re-run does not erase the record of the outputs still there."""
    manifest = Path(job_dir) / MANIFEST_FILE
    if not manifest.is_file():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(manifest.stat().st_mtime))
    archived = ensure_folder(Path(job_dir) / ARCHIVE_DIR) / f"{stamp}-{manifest.stat().st_mtime_ns % 10**9:09d}.json"
    os.replace(manifest, archived)
    return archived
