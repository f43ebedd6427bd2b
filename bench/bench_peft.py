"""Benchmark of medgen.peft methods: trainable parameters, train-step time, peak memory, merged inference time.

Two backbones: a MONAI 3D DDPM ``DiffusionModelUNet`` (TenVOO-L/Q vs Hugging Face peft LoRA vs full fine-tuning)
and MONAI ``SwinUNETR`` (the FSEFT methods). Small sizes on CPU by default; on a GPU use e.g.

    python bench/bench_peft.py --device cuda --size 96

Writes ``bench/results/peft_<device>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from monai.networks.nets import DiffusionModelUNet, SwinUNETR

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json  # noqa: E402

from medgen.devices import describe_device, select_device  # noqa: E402
from medgen.peft import inject, merge, trainable_parameters  # noqa: E402
from medgen.peft.presets import TENVOO_PAPER_TARGETS  # noqa: E402


#: (method, inject options) on the DDPM UNet; LoRA adapts the same layers as the TenVOO recipe but, as peft does,
#: trains only its own factors (no biases/norms)
UNET_METHODS = [
    ("full", {}),
    ("tenvoo-l", {"preset": "tenvoo-paper"}),
    ("tenvoo-q", {"preset": "tenvoo-paper"}),
    ("lora", {"target_modules": TENVOO_PAPER_TARGETS, "rank": 4}),
]
SWIN_METHODS = [
    (method, {"preset": "fseft"})
    for method in ("full", "linear-probe", "spatial-adapter", "affine-norm", "bitfit", "lora", "adaptformer")
]


def build_unet(paper_size: bool) -> DiffusionModelUNet:
    """The TenVOO paper UNet (166.7 M parameters) or a three-level version of it for CPU runs."""
    if paper_size:
        channels, blocks = (32, 32, 64, 128, 256, 512), 2
        attention, heads = (False,) * 4 + (True,) * 2, (0,) * 4 + (256, 512)
    else:
        channels, attention, heads, blocks = (32, 64, 128), (False, False, True), (0, 0, 128), 1
    return DiffusionModelUNet(
        spatial_dims=3, in_channels=1, out_channels=1, num_res_blocks=blocks, channels=channels,
        attention_levels=attention, norm_num_groups=32, norm_eps=1e-6, num_head_channels=heads,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """GPU: peak allocated since the last reset; CPU: this process's peak RSS (each CPU method runs in its own
    process, see :func:`bench_backbone`, so the peak belongs to that method)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """Current resident set size of this process in MB (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def timed(function, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    function()
    durations = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        durations.append(time.perf_counter() - start)
    return statistics.median(durations)


def bench_method(base, method, options, inputs, device, repeats, threads=None) -> dict:
    """Inject, time a train step, then merge and time inference of base / adapted / merged models."""
    if threads:
        torch.set_num_threads(threads)
    options = dict(options)
    preset = options.pop("preset", None)
    base = base.to(device)
    with torch.no_grad():  # timed here too, so base / adapted / merged compare within one process
        base_s = timed(lambda: base(*inputs), repeats, device)
    model = inject(copy.deepcopy(base), method, preset=preset, **options).to(device)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.Adam([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before_training_mb = resident_mb() if device.type == "cpu" else 0.0

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(*inputs).pow(2).mean().backward()
        optimizer.step()

    step_s = timed(train_step, repeats, device)
    peak_mb = peak_memory_mb(device)
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        adapted_s = timed(lambda: model(*inputs), repeats, device)
        merged = merge(model)
        merged_s = timed(lambda: merged(*inputs), repeats, device)
    return {
        "method": method,
        "trainable_parameters": trainable,
        "train_step_s": step_s,
        "peak_memory_mb": peak_mb,
        "training_memory_mb": peak_mb - before_training_mb if device.type == "cpu" else peak_mb,
        "adapted_inference_s": adapted_s,
        "merged_inference_s": merged_s,
        "base_inference_s": base_s,
    }


def run_isolated(function, *args):
    """Run ``function(*args)`` in a fresh spawned process (its own peak RSS) and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def bench_backbone(name, base, methods, inputs, device, repeats, threads=None) -> list[dict]:
    # trained in the mode it comes in: UNet train(), Swin eval() as FSEFT does
    total = sum(parameter.numel() for parameter in base.parameters())
    rows = []
    for method, options in methods:
        arguments = (base.cpu(), method, options, inputs, device, repeats, threads)
        row = run_isolated(bench_method, *arguments) if device.type == "cpu" else bench_method(*arguments)
        row.update(backbone=name, total_parameters=total)
        rows.append(row)
        print(f"  {name} {method}: {row['trainable_parameters']:,} trainable, step {row['train_step_s']:.3f} s")
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| backbone | method | trainable | % | train step (s) | training memory (MB) "
        "| base / adapted / merged inference (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        percent = 100.0 * row["trainable_parameters"] / row["total_parameters"]
        lines.append(
            f"| {row['backbone']} | {row['method']} | {row['trainable_parameters']:,} | {percent:.3f} | "
            f"{row['train_step_s']:.3f} | {row['training_memory_mb']:.0f} | {row['base_inference_s']:.3f} / "
            f"{row['adapted_inference_s']:.3f} / {row['merged_inference_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:N" or "auto"')
    parser.add_argument("--size", type=int, default=None, help="cubic input edge in voxels (default 16 CPU / 96 GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per measurement (after one warm-up)")
    parser.add_argument("--paper-unet", action="store_true", help="use the 166.7 M-parameter TenVOO paper UNet")
    parser.add_argument("--swin-feature-size", type=int, default=None, help="SwinUNETR width (default 12 CPU / 48 GPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one gives steadier timings on a shared machine)")
    args = parser.parse_args()
    if device_is_cpu := not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)

    device = select_device(args.device)
    on_gpu = device.type == "cuda"
    size = args.size or (96 if on_gpu else 16)
    swin_size = max(32, size)  # Swin-UNETR needs edges divisible by 32
    feature_size = args.swin_feature_size or (48 if on_gpu else 12)
    torch.manual_seed(0)
    print(f"device: {describe_device(device)}; volume {size}^3 (Swin {swin_size}^3)", flush=True)

    unet_inputs = (torch.randn(1, 1, size, size, size, device=device), torch.randint(0, 1000, (1,), device=device))
    unet = build_unet(args.paper_unet or on_gpu)
    threads = args.threads if device_is_cpu else None
    rows = bench_backbone("ddpm-unet", unet, UNET_METHODS, unet_inputs, device, args.repeats, threads)
    # instance norms with running statistics keep a 1³ bottleneck valid at 32³ in eval mode (FSEFT trains in eval)
    norm = ("instance", {"track_running_stats": True})
    swin = SwinUNETR(in_channels=1, out_channels=1, feature_size=feature_size, norm_name=norm)
    swin_inputs = (torch.randn(1, 1, swin_size, swin_size, swin_size, device=device),)
    rows += bench_backbone("swin-unetr", swin.eval(), SWIN_METHODS, swin_inputs, device, args.repeats, threads)

    result = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "volume_size": size,
        "swin_volume_size": swin_size,
        "swin_feature_size": feature_size,
        "paper_unet": bool(args.paper_unet or on_gpu),
        "repeats": args.repeats,
        "cpu_threads": threads,
        "memory_note": ("CPU: each method runs in its own process; training memory = peak RSS - RSS before its first step. "
                        "CUDA: peak allocated during the training steps, the weights of the base model and of its "
                        "adapted copy included (2 x parameters x 4 bytes)"),
        "rows": rows,
    }
    out_path = write_json(f"peft_{device.type}", result)
    print(markdown_table(rows))
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
