"""Every adaptation method on the demo task: held-out Dice of deepbet adapted to a SIMULATED T2 contrast.

The task of the README demo's step 2 (``medgen.cli.demo.adaptation_cases``): the real pretrained deepbet
brain-extraction network, two training volumes, one validation and one held-out volume at 4 mm. Each method
is injected with its default options (rank 4 where it has one), fine-tuned with the demo's settings and
scored on the held-out volume; methods that do not apply to deepbet's layers are reported as such.
Usage: python bench/bench_demo_methods.py [--steps 16] [--threads 1]
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

from medgen.adapt.finetune import FinetuneConfig, finetune_segmentation  # noqa: E402
from medgen.cli.demo import adaptation_cases  # noqa: E402
from medgen.errors import MedGenError  # noqa: E402
from medgen.io import load_volume  # noqa: E402
from medgen.metrics import dice_per_class  # noqa: E402
from medgen.models.segmentation import load_segmentation_model, segment  # noqa: E402
from medgen.peft import inject, trainable_parameters  # noqa: E402
from medgen.peft.methods import METHODS  # noqa: E402

RANKED = {"tenvoo-l", "tenvoo-q", "lora"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="demo_methods_"))
    files = adaptation_cases(work / "data")
    pair = lambda role: (load_volume(files[role][0]), load_volume(files[role][1], label=True))  # noqa: E731
    training, validation, (held_out, reference) = [pair("train_a"), pair("train_b")], pair("validation"), pair("held_out")

    base = load_segmentation_model("deepbet")
    base_dice = float(dice_per_class(segment(base, held_out)[0], reference[0], base.num_classes)[1])
    rows = [{"method": "none (deepbet as shipped)", "trainable_parameters": 0, "held_out_dice": base_dice, "train_s": 0.0, "note": ""}]
    for method in METHODS:
        model = load_segmentation_model("deepbet")
        try:
            inject(model.network, method, **({"rank": 4} if method in RANKED else {}))
        except MedGenError as error:
            rows.append({"method": method, "trainable_parameters": 0, "held_out_dice": float("nan"), "train_s": 0.0,
                         "note": f"not applicable: {error}"[:120]})
            continue
        torch.manual_seed(0)
        started = time.perf_counter()
        config = FinetuneConfig(steps=args.steps, lr=args.lr, val_every=8, seed=0)
        finetune_segmentation(model, training, config, checkpoint_dir=work / method, validation=validation)
        dice = float(dice_per_class(segment(model, held_out)[0], reference[0], model.num_classes)[1])
        rows.append({"method": method, "trainable_parameters": trainable_parameters(model.network), "held_out_dice": dice,
                     "train_s": time.perf_counter() - started, "note": ""})
        print(rows[-1], flush=True)
    write_results("demo_methods_cpu", rows, {"steps": args.steps, "lr": args.lr, "threads": args.threads,
                                              "task": "deepbet -> SIMULATED T2 with scalp, 4 mm, 2 training volumes"})


if __name__ == "__main__":
    main()
