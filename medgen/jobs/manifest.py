"""``manifest.json``: what produced a job's outputs (versions, device, seed, parameters, timings)."""

from __future__ import annotations

import importlib.metadata
import json
import platform
import sys
from pathlib import Path
from typing import Any

from medgen.io.atomic import write_text_atomic

MANIFEST_FILE = "manifest.json"
_RECORDED_PACKAGES = ("medgen", "torch", "monai", "numpy", "SimpleITK", "nibabel", "safetensors", "peft")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape MedGen's results (None when absent)."""
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _RECORDED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    if versions["medgen"] is None:
        import medgen

        versions["medgen"] = medgen.__version__
    return versions


def write_manifest(job_dir: Path, **fields: Any) -> Path:
    """Write ``JOB_DIR/manifest.json`` atomically with versions, platform and the given fields."""
    document = {"versions": package_versions(), "platform": platform.platform(), **fields}
    return write_text_atomic(job_dir / MANIFEST_FILE, json.dumps(document, indent=2, default=str) + "\n")
