"""Shared benchmark helpers: timing with warm-up, peak memory, JSON results with the machine."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from medgen.jobs.events import json_safe

#: bench/results (tracked: the README's tables come from it), or $MEDGEN_BENCH_RESULTS for a trial run
RESULTS_DIR = Path(os.environ.get("MEDGEN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1) -> tuple[float, float | None]:
    """Median seconds per call and peak GPU memory in GiB (None on CPU)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return sorted(times)[len(times) // 2], peak


def write_json(name: str, document: dict) -> Path:
    """Write ``<RESULTS_DIR>/<name>.json`` as strict JSON (NaN and inf become null)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")
    return path


def write_results(name: str, rows: list[dict], settings: dict) -> Path:
    """Write ``<RESULTS_DIR>/<name>.json`` (see :func:`write_json`) and print a markdown table of ``rows``."""
    path = write_json(name, {"machine": machine(), "settings": settings, "rows": rows})
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    print(f"\nwritten {path}")
    return path
