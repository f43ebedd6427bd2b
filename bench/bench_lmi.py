"""Benchmark: LMI map time and peak memory, fast operator vs the unfold-based port of the released code.

Usage::

    python bench/bench_lmi.py                      # CPU, 32³ and 48³
    python bench/bench_lmi.py --device cuda        # GPU, 64³ and 128³
    python bench/bench_lmi.py --sizes 16 24 --mode clean                     # -> lmi_clean_auto_cpu.json
    python bench/bench_lmi.py --device cuda --mode clean --backend torch    # box sums vs the port on a GPU
    python bench/bench_lmi.py --device cuda --kernel-sweep  # Triton candidate blocks × warps at 128³ vs the port

Each (method, size) runs in a fresh subprocess so that peak memory is its own: on CUDA
``torch.cuda.max_memory_allocated`` above the inputs, on CPU the growth of the process's peak
resident set (``ru_maxrss``) over the inputs. Both methods get the same memory budget. On a shared
CPU, wall time swings with the load; ``cpu_s`` (process CPU time) is the steadier number. Writes
``bench/results/lmi_<device>.json`` (``lmi_<mode>_<backend>_<device>.json`` for other modes or backends)
and prints a markdown table with the speed-up. ``--kernel-sweep`` times the fused Triton kernel for every
candidate block (:data:`medgen.translate.lmi_triton.CANDIDATE_BLOCK`) and warp count at the largest size,
against one port run, and writes ``lmi_kernel_sweep_<mode>_<device>.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
METHODS = ("unfold_port", "medgen_lmi")
#: the Triton kernel configurations of --kernel-sweep: candidates per loop step × warps per program
SWEEP_BLOCKS, SWEEP_WARPS = (1, 2, 4, 8), (1, 2, 4)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _measure(
    method: str, size: int, device_name: str, mode: str, budget_mb: float, backend: str, output_path: str,
    kernel: tuple[int, int] | None = None,
) -> dict:
    """Run one LMI map in this process and return its wall time and peak memory; ``kernel`` = (candidate
    block, warps) of the Triton kernel when sweeping."""
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    from safetensors.torch import save_file

    from medgen.devices import select_device
    from medgen.translate.lmi import lmi_map
    from medgen.translate.lmi_reference import lmi_map_reference

    if kernel is not None:
        from medgen.translate import lmi_triton

        lmi_triton.CANDIDATE_BLOCK, lmi_triton.NUM_WARPS = kernel

    device = select_device(device_name)
    options = dict(compat=mode == "compat", memory_budget_mb=budget_mb)
    if method == "medgen_lmi":
        operator, options["backend"] = lmi_map, backend
    else:
        operator = lmi_map_reference
    generator = torch.Generator().manual_seed(0)
    source = torch.rand((1, 1, size, size, size), generator=generator)
    # a diffusion-like moving volume: the source plus Gaussian noise, partly outside [0, 1]
    moving = source * 0.7 + 0.3 * torch.randn(source.shape, generator=generator)
    source, moving = source.to(device), moving.to(device)

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        # warm up on the measured size: Triton compiles one kernel per size class (e.g. edges divisible by 16).
        operator(source, moving, **options)
        synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        baseline_bytes = torch.cuda.memory_allocated(device)
    else:
        # one-time costs (lazy imports, thread pool, allocator arenas: 0.3 s and 100 MB at 16^3) on an 8^3 corner;
        # not on the measured size, since the process's peak RSS never falls and would hide the measured peak
        corner = (..., slice(0, 8), slice(0, 8), slice(0, 8))
        operator(source[corner].contiguous(), moving[corner].contiguous(), **options)
    baseline_rss_mb = _peak_rss_mb()
    start, start_cpu = time.perf_counter(), time.process_time()
    lmi, offsets = operator(source, moving, **options)
    synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2**20
    else:
        peak_mb = _peak_rss_mb() - baseline_rss_mb
    save_file({"lmi": lmi.cpu().contiguous(), "offsets": offsets.cpu().contiguous()}, output_path)
    row = {
        "method": method, "size": size, "seconds": round(seconds, 4), "cpu_s": round(cpu_seconds, 4),
        "peak_mb": round(peak_mb, 1),
    }
    if kernel is not None:
        row["candidate_block"], row["num_warps"] = kernel
    return row


def _run_worker(
    method: str, size: int, args: argparse.Namespace, output_path: str, kernel: tuple[int, int] | None = None
) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--sizes", str(size), "--device", args.device,
        "--mode", args.mode, "--memory-budget-mb", str(args.memory_budget_mb), "--backend", args.backend,
        "--output", output_path,
    ]
    if kernel is not None:
        command += ["--kernel", *map(str, kernel)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _compare(paths: dict[str, str]) -> dict:
    """Max |Δ| of the maps and the fraction of voxels whose displacement differs (near-ties)."""
    from safetensors.torch import load_file

    port, ours = load_file(paths["unfold_port"]), load_file(paths["medgen_lmi"])
    return {
        "max_abs_diff": float((port["lmi"] - ours["lmi"]).abs().max()),
        "offset_disagreement": float((port["offsets"] != ours["offsets"]).any(dim=1).float().mean()),
    }


def _kernel_sweep(args: argparse.Namespace, device: dict, machine: dict, write_json) -> None:
    """One port run and one Triton run per (candidate block, warps) at the largest size; table + JSON.

    The JSON is rewritten after every configuration, so a sweep stopped at a time limit keeps what finished.
    """
    size = max(args.sizes)
    rows, table = [], []
    result = {
        "benchmark": "lmi_kernel_sweep", "mode": args.mode, "size": size, "memory_budget_mb": args.memory_budget_mb,
        "device": device, "machine": machine, "measurements": rows, "comparison": table,
    }
    name = f"lmi_kernel_sweep_{args.mode}_{args.device.replace(':', '')}"
    with tempfile.TemporaryDirectory() as scratch:
        port_path = str(Path(scratch) / "port.safetensors")
        port = _run_worker("unfold_port", size, args, port_path)
        rows.append(port)
        for kernel in itertools.product(SWEEP_BLOCKS, SWEEP_WARPS):
            path = str(Path(scratch) / f"medgen_{kernel[0]}_{kernel[1]}.safetensors")
            ours = _run_worker("medgen_lmi", size, args, path, kernel)
            agreement = _compare({"unfold_port": port_path, "medgen_lmi": path})
            rows.append(ours)
            table.append({"candidate_block": kernel[0], "num_warps": kernel[1], "seconds": ours["seconds"],
                          "speedup": round(port["seconds"] / ours["seconds"], 2), **agreement})
            out_path = write_json(name, result)
    print(f"Triton LMI kernel sweep, {args.mode} mode, {size}³, {device['name']}: port {port['seconds']:.2f} s\n")
    print("| candidate block | warps | s | speed-up vs port | max abs diff | offsets differ |")
    print("|---|---|---|---|---|---|")
    for entry in sorted(table, key=lambda entry: entry["seconds"]):
        print(f"| {entry['candidate_block']} | {entry['num_warps']} | {entry['seconds']:.3f} | {entry['speedup']:.1f}× | "
              f"{entry['max_abs_diff']:.1e} | {entry['offset_disagreement']:.2%} |")
    print(f"\nwritten {out_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--sizes", type=int, nargs="+", help="cube edges (default: 32 48 on CPU, 64 128 on CUDA)")
    parser.add_argument("--mode", choices=("compat", "clean"), default="compat",
                        help="compat is the released algorithm (the port's home ground)")
    parser.add_argument("--memory-budget-mb", type=float, help="budget for both methods (default 1024 CPU, 16384 CUDA)")
    parser.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto",
                        help="MedGen's operator: auto (Triton on CUDA), torch (box sums in clean mode) or triton")
    parser.add_argument("--kernel-sweep", action="store_true",
                        help="time the Triton kernel's candidate blocks × warps at the largest size (CUDA only)")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--kernel", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = args.device.startswith("cuda")
    args.sizes = args.sizes or ([64, 128] if on_cuda else [32, 48])
    args.memory_budget_mb = args.memory_budget_mb or (16384.0 if on_cuda else 1024.0)
    if args.worker:
        measurement = _measure(args.worker, args.sizes[0], args.device, args.mode, args.memory_budget_mb, args.backend,
                               args.output, tuple(args.kernel) if args.kernel else None)
        print(json.dumps(measurement))
        return

    sys.path.insert(0, str(REPO_ROOT))
    from common import machine, write_json  # bench/common.py, next to this script

    from medgen.devices import describe_device, select_device

    if args.kernel_sweep:
        if not on_cuda:
            parser.error("--kernel-sweep times the Triton kernel compiled for a GPU: use --device cuda")
        args.backend = "triton"
        _kernel_sweep(args, describe_device(select_device(args.device)), machine(), write_json)
        return

    rows, table = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            paths = {method: str(Path(scratch) / f"{method}_{size}.safetensors") for method in METHODS}
            measured = {method: _run_worker(method, size, args, paths[method]) for method in METHODS}
            agreement = _compare(paths)
            speedup = measured["unfold_port"]["seconds"] / measured["medgen_lmi"]["seconds"]
            cpu_speedup = measured["unfold_port"]["cpu_s"] / measured["medgen_lmi"]["cpu_s"]
            rows.extend(measured.values())
            table.append(
                {"size": size, "speedup": round(speedup, 2), "cpu_speedup": round(cpu_speedup, 2), **agreement}
            )
    result = {
        "benchmark": "lmi_map",
        "mode": args.mode,
        "backend": args.backend,
        "memory_budget_mb": args.memory_budget_mb,
        "device": describe_device(select_device(args.device)),
        "machine": machine(),
        "measurements": rows,
        "comparison": table,
    }
    variant = "" if (args.mode, args.backend) == ("compat", "auto") else f"_{args.mode}_{args.backend}"
    out_path = write_json(f"lmi{variant}_{args.device.replace(':', '')}", result)

    by_key = {(row["method"], row["size"]): row for row in rows}
    print(f"LMI map, {args.mode} mode, backend {args.backend}, {result['device']['name']}, "
          f"budget {args.memory_budget_mb:.0f} MB\n")
    print(
        "| size | unfold port s | medgen s | speed-up | port CPU s | medgen CPU s | CPU-time speed-up "
        "| port peak MB | medgen peak MB | max abs diff | offsets differ |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for entry in table:
        port, ours = by_key[("unfold_port", entry["size"])], by_key[("medgen_lmi", entry["size"])]
        print(
            f"| {entry['size']}³ | {port['seconds']:.2f} | {ours['seconds']:.2f} | {entry['speedup']:.1f}× | "
            f"{port['cpu_s']:.1f} | {ours['cpu_s']:.1f} | {entry['cpu_speedup']:.1f}× | {port['peak_mb']:.0f} | "
            f"{ours['peak_mb']:.0f} | {entry['max_abs_diff']:.1e} | "
            f"{entry['offset_disagreement']:.2%} |"
        )
    print(f"\nwritten {out_path}")


if __name__ == "__main__":
    main()
