"""Zero-shot translation on textured 3-class phantoms (spec A.9 item 12; issue CrossModalTranslate, quality evidence).

Setup: target-modality phantoms ``LUT_T[class] + texture``; source phantoms ``LUT_S[class] + texture`` (nested core/shell/background
classes) where LUT_S is a non-monotone permutation of LUT_T. A tiny LMI-conditioned model and a tiny unconditional model
(SDEdit baseline, same family) are trained on target phantoms only; held-out source phantoms are translated.

Measured, per seed:
(a) mean LMI(S, translate(S)) vs mean LMI(S, translate(S')) with an unrelated source S';
(b) Dice of the tissue classes read from the output by nearest target intensity, for LMI translation and
    for SDEdit at t=500, against the phantom labels; for reference, the unconditional model sampled from
    pure noise (the target prior alone: the nested layout is predictable, so this is well above chance).
The LMI model samples with DDPM, all 1000 steps as released (``--sampler ddim`` for the strided option:
with these tiny models deterministic DDIM drifts, half the voxels end saturated at 0 or 1, while DDPM's
fresh noise keeps them in range; SDEdit runs DDPM too).
Usage: python bench/bench_translation_phantom.py [--steps 2500] [--seeds 4] [--sampler ddpm] [--device cpu]
    (~35 min on one CPU core: 1000 LMI maps per translation)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.data import MetaTensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from medgen.metrics import dice_per_class  # noqa: E402
from medgen.translate.lmi import lmi_map  # noqa: E402
from medgen.translate.model import TranslationConfig, from_model_grid, to_model_grid, train_translation, translate_volume  # noqa: E402

LUT_TARGET = (0.15, 0.5, 0.85)
#: class -> source intensity; T->S is 0.15->0.5, 0.5->0.85, 0.85->0.15: a non-monotone map
LUT_SOURCE = (0.5, 0.85, 0.15)


def phantom_labels(seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """Three nested tissue classes, ``(I, J, K)`` int64: a core (2) inside a shell (1) inside background (0),
    with a random centre, radii and a smooth random deformation of the boundaries.

    Nesting gives the classes an anatomy-like layout a target-only model can learn (as brain tissue does);
    with interchangeable classes no zero-shot method could tell which region is which.
    """
    generator = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    centre = (torch.rand(3, 1, 1, 1, generator=generator) - 0.5) * 0.3
    radius = ((grid - centre) / (0.9 + 0.2 * torch.rand(3, 1, 1, 1, generator=generator))).pow(2).sum(0).sqrt()
    wobble = torch.randn((1, 1, *shape), generator=generator)
    for _ in range(2):
        wobble = F.avg_pool3d(wobble, 5, stride=1, padding=2, count_include_pad=False)
    radius = radius + 0.6 * wobble[0, 0]
    return (radius < 1.2).long() + (radius < 0.75).long()


def render(labels: torch.Tensor, lut: tuple[float, ...], seed: int) -> MetaTensor:
    """``lut[class]`` plus a fine texture (std ~0.04), as a ``(1, I, J, K)`` volume."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    texture = F.avg_pool3d(torch.randn((1, 1, *labels.shape), generator=generator), 3, stride=1, padding=1)[0, 0]
    return MetaTensor((torch.tensor(lut)[labels] + 0.12 * texture)[None], affine=torch.eye(4, dtype=torch.float64))


def classes_by_nearest(volume: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Class map ``(I, J, K)`` by the nearest class centre intensity."""
    return (volume[0, ..., None] - centres).abs().argmin(-1)


def mean_lmi(config: TranslationConfig, source: MetaTensor, other: MetaTensor) -> float:
    grid_source, grid_other = to_model_grid(source, config, "source"), to_model_grid(other, config, "other")
    return float(lmi_map(grid_source, grid_other, normalize=config.lmi_normalize)[0].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 16, 8))
    parser.add_argument("--train-volumes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=2500, help="optimiser steps per model")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddpm", help="LMI translation sampler")
    parser.add_argument("--ddim-steps", type=int, default=25, help="with --sampler ddim")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny networks run fastest on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    torch.manual_seed(0)
    base = dict(mode="2.5d", grid=shape, steps=args.steps, batch_size=8, lr=1e-3, ema_decay=0.995,
                channels=(16, 32), norm_num_groups=8)
    targets = [render(phantom_labels(seed, shape), LUT_TARGET, seed) for seed in range(args.train_volumes)]
    folder = Path(tempfile.mkdtemp())
    start = time.perf_counter()
    lmi_model = train_translation(targets, folder / "lmi", TranslationConfig.tiny(**base), device=args.device)
    sdedit_model = train_translation(targets, folder / "uncond", TranslationConfig.tiny(conditioned=False, **base), device=args.device)
    train_s = time.perf_counter() - start
    config = TranslationConfig.tiny(**base)
    # class centres on the model's intensity scale (each volume is percentile-scaled on its way in), read
    # back on the volume grid so that voxels line up with the labels (a 2.5d model grid is slice-major)
    scaled = torch.cat([from_model_grid(to_model_grid(t, config, "t"), t, config).as_tensor().flatten() for t in targets[:2]])
    training_labels = torch.cat([phantom_labels(s, shape).flatten() for s in range(2)])
    centres = torch.stack([scaled[training_labels == c].mean() for c in range(3)])

    rows = []
    for seed in range(args.seeds):
        case, unrelated_case = 100 + seed, 200 + seed
        labels = phantom_labels(case, shape)
        source = render(labels, LUT_SOURCE, case)
        unrelated = render(phantom_labels(unrelated_case, shape), LUT_SOURCE, unrelated_case)
        started = time.perf_counter()
        translated = translate_volume(source, lmi_model, sampler=args.sampler, steps=args.ddim_steps, seed=seed, device=args.device)
        translate_s = time.perf_counter() - started
        from_unrelated = translate_volume(unrelated, lmi_model, sampler=args.sampler, steps=args.ddim_steps, seed=seed, device=args.device)
        sdedit = translate_volume(source, sdedit_model, sampler="ddpm", sdedit_start=499, seed=seed, device=args.device)
        # the same model from pure noise: what the target prior alone gets, without the source
        prior = translate_volume(source, sdedit_model, sampler="ddpm", sdedit_start=999, seed=seed, device=args.device)
        # outputs are already on the model's [0, 1] scale and grid (the source was on the model grid)
        dice_lmi, dice_sdedit, dice_prior = (dice_per_class(classes_by_nearest(output.as_tensor(), centres), labels, 3)
                                             for output in (translated, sdedit, prior))
        rows.append({
            "seed": seed,
            "lmi_own_source": mean_lmi(config, source, translated),
            "lmi_unrelated_source": mean_lmi(config, source, from_unrelated),
            "dice_lmi_translation": float(dice_lmi.mean()),
            "dice_sdedit_t500": float(dice_sdedit.mean()),
            "dice_unconditional_sample": float(dice_prior.mean()),
            "translate_s": translate_s,
        })
        print(rows[-1], flush=True)
    summary = {key: statistics.mean(row[key] for row in rows) for key in rows[0] if key != "seed"}
    rows.append({"seed": "mean", **summary})
    write_results(f"translation_phantom_{args.device}", rows, {
        "shape": list(shape), "train_volumes": args.train_volumes, "train_steps_per_model": args.steps,
        "sampler": args.sampler, "ddim_steps": args.ddim_steps if args.sampler == "ddim" else None, "lut_target": LUT_TARGET, "lut_source": LUT_SOURCE, "train_s": train_s,
        "claims": {"a_own_beats_unrelated": summary["lmi_own_source"] > summary["lmi_unrelated_source"],
                   "b_lmi_dice_beats_sdedit": summary["dice_lmi_translation"] > summary["dice_sdedit_t500"]},
    })


if __name__ == "__main__":
    main()
