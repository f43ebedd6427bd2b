"""How many training steps the tiny translation preset needs on the sample brain (the README's Slicer tutorial).

Trains the tiny 2.5D model (32³ grid) on the 2 mm sample T1 only, for each step count, translates the SIMULATED PD
volume with DDIM, and reports the output's correlation with the real T1 inside the brain and its mean per tissue
class. Each step count trains from scratch (seed 0), as a user would. About 4.5 minutes per 2,000 steps on 2 CPU cores.
Usage: python bench/bench_translation_sample.py [--steps 200 1000 2000 4000] [--ddim-steps 50] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from medgen.data.samples import TISSUE_LABELS, load_sample_case  # noqa: E402
from medgen.translate.model import TranslationConfig, train_translation, translate_volume  # noqa: E402


def brain_correlation(first: torch.Tensor, second: torch.Tensor, brain: torch.Tensor) -> float:
    """Pearson correlation of two volumes over the voxels of ``brain``."""
    return float(torch.corrcoef(torch.stack([first[brain].float(), second[brain].float()]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 1000, 2000, 4000], help="training step counts")
    parser.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps of the translation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    case = load_sample_case("reduced")
    labels, t1 = case.tissue_labels.as_tensor(), case.t1.as_tensor()
    brain = labels > 0

    def row(model: str, volume: torch.Tensor, train_s: float = 0.0, translate_s: float = 0.0) -> dict:
        """One table row: ``volume``'s T1 correlation inside the brain and its mean per tissue class."""
        return {"model": model, "train_s": train_s, "translate_s": translate_s,
                "t1_correlation": brain_correlation(volume, t1, brain),
                **{f"{label.name} mean": float(volume[labels == label.value].mean()) for label in TISSUE_LABELS}}

    rows = [row("PD source itself", case.pd_simulated.as_tensor()), row("real T1 (target)", t1)]
    for steps in args.steps:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            model = train_translation([case.t1], folder, TranslationConfig.tiny(steps=steps), device=args.device,
                                      target_modality="T1")
            trained = time.perf_counter()
            output = translate_volume(case.pd_simulated, model, sampler="ddim", steps=args.ddim_steps, device=args.device)
            translated = time.perf_counter()
        rows.append(row(f"tiny, {steps} steps", output.as_tensor(), trained - started, translated - trained))
        write_results("translation_sample_" + args.device, rows,
                      {"sample": "reduced (2 mm)", "mode": "2.5d", "grid": [32, 32, 32], "ddim_steps": args.ddim_steps,
                       "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
