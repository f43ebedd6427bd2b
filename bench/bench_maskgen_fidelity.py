"""Toy fidelity of mask-conditioned synthesis (spec B.10 item 10; MRGen-style generator, tiny, CPU).

Setup: label phantoms with two organs (a large and a small ellipsoid of random size, shape and position);
"modality A" = LUT_A[label] + texture, "modality B" = LUT_B[label] + texture, B's LUT a non-monotone
permutation of A's. Only A has masks: the generator trains on (A image, label) source cases and on
unlabelled B images of other phantoms; all its stages (VAE, latent UNet + prompt encoder, ControlNet,
checker) are trained tiny. B images are then generated from held-out A masks with the B prompt.

Measured:
(a) a per-class 1D Gaussian voxel classifier fitted on REAL B images (with labels the generator never sees)
    labels the generated B images; Dice against the conditioning masks per organ and mean (target >= 0.8).
    Baselines: the raw A images of the same masks through that classifier (near 0: the LUTs differ), real B
    renderings of the same masks (the classifier's ceiling), and the generator before any ControlNet training;
(b) the filter's acceptance (masks with >= 1 accepted candidate; candidates passing the thresholds) of
    ``synthesize_from_masks`` after 0, few and more ControlNet steps (the ControlNet stage is resumed in the
    same folder to a higher step count), at fixed relaxed thresholds (in ``settings``);
(c) a tiny segmenter (the checker's network, trained on real images only) trained on the accepted synthetic B
    pairs beats one trained on the raw A cases, both tested on real B (``--segmenter-steps 0`` skips it).

Usage: python bench/bench_maskgen_fidelity.py [--size 16] [--small-organ-radius 0.22 0.35] [--vae-factor 2]
    [--vae-steps 6000] [--vae-lr 2e-3] [--unet-steps 3000]
    [--controlnet-steps 1500 6000] [--controlnet-lr 1e-3] [--checker-steps 1000] [--candidates 4] [--ddim-steps 20]
    [--guidance 3] [--conditioning-scale 1] [--ema-decay D] [--segmenter-steps 400] [--unet-attention 1 1]
    [--target-pseudo-labels] [--controlnet-flip-axes 0 1 2] [--unet-flip-axes 0 1 2] [--seed 0] [--work DIR] [--results NAME]
    (~30 min per 6000 ControlNet steps on one CPU thread)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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

from medgen.io import load_volume  # noqa: E402
from medgen.metrics import dice_per_class  # noqa: E402
from medgen.synthesis.checker import CheckerConfig, load_checker, score_candidates, train_checker  # noqa: E402
from medgen.synthesis.filtering import FilterThresholds  # noqa: E402
from medgen.synthesis.maskgen import MaskGenModel, generate_on_model_grid, mask_seed, synthesize_from_masks  # noqa: E402
from medgen.synthesis.maskgen_training import train_maskgen  # noqa: E402
from medgen.synthesis.maskgen_networks import MaskGenConfig  # noqa: E402
from medgen.synthesis.prompts import Prompt  # noqa: E402

ORGANS = ("liver", "kidney")
#: background, organ 1, organ 2: B's order of brightness (organ 1 > background > organ 2) is not A's
LUT_A = (0.1, 0.5, 0.9)
LUT_B = (0.5, 0.9, 0.15)
SOURCE, TARGET = Prompt("A MRI", region="abdomen"), Prompt("B MRI", region="abdomen")
#: fixed, relaxed acceptance thresholds (MRGen's 0.9/0.8/0.7/0.8 are for a full-size checker)
THRESHOLDS = FilterThresholds(avg_confidence=0.75, avg_iou=0.6, organ_iou=0.5, organ_confidence=0.7)
#: tiny-preset overrides per VAE downsampling factor (the ControlNet embedding downsamples by the same factor)
VAE_FACTOR_OVERRIDES = {4: {}, 2: {"vae_channels": (8, 16), "control_embedding_channels": (8, 16)}}
#: radii of the small organ, in half-widths of the grid: 1.6-2.6 voxels at 16³
SMALL_RADIUS = (0.22, 0.35)


def phantom_label(seed: int, size: int, small_radius: tuple[float, float] = SMALL_RADIUS) -> torch.Tensor:
    """``(1, I, J, K)`` int64: a large ellipsoid (1) and a small one (2) side by side along x, which one on the
    left drawn at random, with random radii (the small one's uniform in ``small_radius``, in units of the
    half-width of the grid) and centre jitter (so an unconditional model cannot guess the layout); the small
    one never overwrites the large one."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, size)] * 3, indexing="ij"))

    def uniform(low: float, high: float, n: int = 3) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    def ellipsoid(centre: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
        return (((grid - centre.view(3, 1, 1, 1)) / radii.view(3, 1, 1, 1)) ** 2).sum(0) < 1

    side = 1.0 if torch.rand((), generator=generator) < 0.5 else -1.0
    label = torch.zeros((size,) * 3, dtype=torch.int64)
    label[ellipsoid(torch.tensor([-0.35 * side, 0.0, 0.0]) + uniform(-0.2, 0.2), uniform(0.35, 0.55))] = 1
    small = ellipsoid(torch.tensor([0.5 * side, 0.0, 0.0]) + uniform(-0.15, 0.15), uniform(*small_radius))
    label[small & (label == 0)] = 2
    return label[None]


def render(label: torch.Tensor, lut: tuple[float, ...], seed: int) -> MetaTensor:
    """``lut[label]`` + smooth texture (std ~0.03) + white noise (std 0.02), clamped to [0, 1]."""
    generator = torch.Generator().manual_seed(100_000 + seed)
    texture = F.avg_pool3d(torch.randn((1, *label.shape), generator=generator), 3, stride=1, padding=1)[0]
    image = torch.tensor(lut)[label] + 0.1 * texture + 0.02 * torch.randn(label.shape, generator=generator)
    return MetaTensor(image.clamp(0.0, 1.0).float(), affine=torch.eye(4, dtype=torch.float64))


class GaussianVoxelClassifier:
    """Per-class 1D Gaussian (mean, std, prior) of voxel intensity; predicts the maximum-posterior class."""

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], num_classes: int):
        values = torch.cat([image.flatten() for image in images]).double()
        classes = torch.cat([label.flatten() for label in labels])
        self.mean = torch.stack([values[classes == c].mean() for c in range(num_classes)])
        self.std = torch.stack([values[classes == c].std() for c in range(num_classes)])
        self.log_prior = torch.stack([(classes == c).double().mean().log() for c in range(num_classes)])

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """Class map ``(I, J, K)`` of an image ``(1, I, J, K)``."""
        x = torch.as_tensor(image).double()[0, ..., None]
        log_likelihood = -0.5 * ((x - self.mean) / self.std) ** 2 - self.std.log() + self.log_prior
        return log_likelihood.argmax(-1)


def organ_dice(prediction: torch.Tensor, label: torch.Tensor) -> list[float]:
    """Dice of organs 1 and 2 between two ``(I, J, K)`` maps."""
    return [float(d) for d in dice_per_class(prediction, label, 1 + len(ORGANS))[1:]]


def mean_dice(classifier, images, labels) -> list[float]:
    """Per-organ Dice of ``classifier(image)`` vs label, averaged over the images."""
    per_image = [organ_dice(classifier(image), label[0]) for image, label in zip(images, labels)]
    return [statistics.mean(column) for column in zip(*per_image)]


def dice_rows(rows: list, what: str, dice: list[float], target: str = "") -> None:
    for organ, value in zip(ORGANS, dice):
        rows.append({"check": f"{what}: Dice {organ}", "value": value, "target": target})
    rows.append({"check": f"{what}: Dice mean", "value": statistics.mean(dice), "target": target})


def evaluate_stage(model_dir: Path, masks: list, classifier, args, out_dir: Path) -> dict:
    """Dice of every generated candidate (classifier fitted on real B) and the acceptance of ``synthesize_from_masks``."""
    model = MaskGenModel.load(model_dir)
    prompt = model.prompt(TARGET.modality)
    candidates = []
    for index, (_, label) in enumerate(masks):
        # synthesize_from_masks seeds mask i with mask_seed(0, i) (run seed 0): these are the candidates its filter sees
        candidates.append(generate_on_model_grid(model, label, prompt, count=args.candidates, chunk=args.candidates,
                                                 steps=args.ddim_steps, guidance_scale=args.guidance,
                                                 conditioning_scale=args.conditioning_scale, seed=mask_seed(0, index)))
    dice = [[organ_dice(classifier(image), label[0]) for image in images] for images, (_, label) in zip(candidates, masks)]
    # mean intensity of each class region of every candidate: is the contrast B's, A's, or between?
    means = [[[float(image[0][label[0] == c].mean()) for c in range(1 + len(ORGANS))] for image in images]
             for images, (_, label) in zip(candidates, masks)]
    in_source_contrast = [[abs(m[0] - LUT_A[0]) < abs(m[0] - LUT_B[0]) for m in per_mask] for per_mask in means]
    report = synthesize_from_masks(model_dir, masks, out_dir, target_modality=TARGET.modality, candidates=args.candidates,
                                   chunk=args.candidates, steps=args.ddim_steps, guidance_scale=args.guidance,
                                   conditioning_scale=args.conditioning_scale, thresholds=THRESHOLDS, seed=0)
    scores = [score for result in report.masks for score in result.scores]
    accepted = [(m, score.candidate) for m, result in enumerate(report.masks) for score in result.decision.accepted]
    return {
        "dice": [statistics.mean(d[j] for per_mask in dice for d in per_mask) for j in range(len(ORGANS))],
        "accepted_dice": [statistics.mean(dice[m][k][j] for m, k in accepted) for j in range(len(ORGANS))] if accepted else None,
        "class_means": [statistics.mean(m[c] for per_mask in means for m in per_mask) for c in range(1 + len(ORGANS))],
        "in_source_contrast": statistics.mean(flag for per_mask in in_source_contrast for flag in per_mask),
        "accepted_in_source_contrast": statistics.mean(in_source_contrast[m][k] for m, k in accepted) if accepted else None,
        "masks_accepted": statistics.mean(result.status == "accepted" for result in report.masks),
        "candidates_passing": statistics.mean(not THRESHOLDS.failures(score) for score in scores),
        "checker_avg_iou": statistics.mean(score.avg_iou for score in scores),
        "pairs": report.pairs,
    }


def train_segmenter(images: list, labels: list, steps: int) -> torch.nn.Module:
    """The checker's tiny UNet trained supervised on ``images`` only (no intensity randomisation)."""
    config = CheckerConfig.tiny(steps=steps, real_image_prob=1.0, checkpoint_every=max(steps, 1), batch_size=min(2, len(images)))
    return train_checker(labels, len(ORGANS), config, images=images)


def segmenter_dice(segmenter: torch.nn.Module, images: list, labels: list) -> list[float]:
    with torch.no_grad():
        return mean_dice(lambda image: segmenter(image[None].float())[0].argmax(0), images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16, help="cubic grid size (multiple of 4)")
    parser.add_argument("--small-organ-radius", dest="small_radius", type=float, nargs=2, default=SMALL_RADIUS,
                        metavar=("LOW", "HIGH"), help="radius range of the small organ in half-widths of the grid")
    parser.add_argument("--sources", type=int, default=24, help="labelled modality-A training cases")
    parser.add_argument("--targets", type=int, default=24, help="unlabelled modality-B training images")
    parser.add_argument("--masks", type=int, default=12, help="held-out A masks to generate B images from")
    parser.add_argument("--references", type=int, default=8, help="labelled real B images (classifier fit, segmenter test)")
    parser.add_argument("--vae-factor", type=int, choices=(2, 4), default=2,
                        help="VAE downsampling: 4 is the tiny preset (16³ -> 4³ latents), 2 keeps 8³ latents")
    parser.add_argument("--vae-steps", type=int, default=6000)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--controlnet-steps", type=int, nargs="+", default=[1500, 6000],
                        help="increasing ControlNet step counts to evaluate at (0 is always evaluated first)")
    parser.add_argument("--controlnet-lr", type=float, default=1e-3)
    parser.add_argument("--checker-steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="EMA decay of the latent UNet and ControlNet (default: the tiny preset's 0.9, sized for 60-step tests)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--ddim-steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--conditioning-scale", type=float, default=1.0, help="ControlNet strength at generation")
    parser.add_argument("--segmenter-steps", type=int, default=400, help="(c); 0 skips it")
    parser.add_argument("--unet-attention", type=int, nargs=2, choices=(0, 1), default=None, metavar="FLAG",
                        help="attention (so the prompt) per latent UNet level (default: the tiny preset's 1 1; "
                             "0 1 keeps the prompt off the high-resolution level)")
    parser.add_argument("--target-pseudo-labels", action="store_true",
                        help="extension: the ControlNet also sees the B images with the checker's predicted masks")
    parser.add_argument("--controlnet-flip-axes", type=int, nargs="*", choices=(0, 1, 2), default=[],
                        help="extension: the ControlNet stage flips image + mask along these axes at random (the phantoms are symmetric)")
    parser.add_argument("--unet-flip-axes", type=int, nargs="*", choices=(0, 1, 2), default=[],
                        help="extension: the latent UNet stage flips the images along these axes at random")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every stage (the data are fixed)")
    parser.add_argument("--threads", type=int, default=1, help="tiny 3D nets run far faster on one thread on a loaded CPU")
    parser.add_argument("--work", default=None, help="model/output folder (default: a new temporary one)")
    parser.add_argument("--results", default=None,
                        help="results file name (default: maskgen_fidelity[_pseudolabels]_cpu)")
    args = parser.parse_args()
    if sorted(set(args.controlnet_steps)) != args.controlnet_steps or args.controlnet_steps[0] < 1:
        parser.error("--controlnet-steps must be increasing and positive")
    torch.set_num_threads(args.threads)
    started_s = time.monotonic()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="maskgen_fidelity_"))
    size = args.size
    small_radius = tuple(args.small_radius)

    sources = [(render(label, LUT_A, seed), MetaTensor(label, affine=torch.eye(4, dtype=torch.float64)))
               for seed in range(args.sources) for label in [phantom_label(seed, size, small_radius)]]
    target_labels = [phantom_label(1000 + seed, size, small_radius) for seed in range(args.targets)]
    targets = [render(label, LUT_B, 1000 + seed) for seed, label in enumerate(target_labels)]
    mask_labels = [phantom_label(2000 + seed, size, small_radius) for seed in range(args.masks)]
    masks = [(f"mask{seed}", MetaTensor(label, affine=torch.eye(4, dtype=torch.float64))) for seed, label in enumerate(mask_labels)]
    reference_labels = [phantom_label(3000 + seed, size, small_radius) for seed in range(args.references)]
    reference_images = [render(label, LUT_B, 3000 + seed) for seed, label in enumerate(reference_labels)]
    classifier = GaussianVoxelClassifier(reference_images, reference_labels, 1 + len(ORGANS))

    rows: list[dict] = []
    dice_rows(rows, "real B of the masks (classifier ceiling)", mean_dice(classifier, [render(l, LUT_B, 2000 + s) for s, l in enumerate(mask_labels)], mask_labels))
    dice_rows(rows, "raw A of the masks (baseline)", mean_dice(classifier, [render(l, LUT_A, 2000 + s) for s, l in enumerate(mask_labels)], mask_labels))

    timings, stages = {}, {}
    # a resumed --work folder cannot go back: a stage below its ControlNet checkpoint would evaluate the later model
    latest = work / "model" / "controlnet" / "latest.json"
    trained = json.loads(latest.read_text())["step"] if latest.is_file() else 0
    if trained > args.controlnet_steps[-1]:
        parser.error(f"--work holds a ControlNet trained {trained} steps, more than the last --controlnet-steps")
    if trained:
        print(f"--work holds a ControlNet trained {trained} steps: step counts below it are not evaluated", flush=True)
    config_overrides = {} if args.unet_attention is None else {"unet_attention": tuple(map(bool, args.unet_attention))}
    if args.ema_decay is not None:
        config_overrides["ema_decay"] = args.ema_decay
    config_overrides["controlnet_flip_axes"] = tuple(args.controlnet_flip_axes)
    config_overrides["unet_flip_axes"] = tuple(args.unet_flip_axes)
    for controlnet_steps in [steps for steps in [0, *args.controlnet_steps] if steps >= trained]:
        config = MaskGenConfig.tiny(**VAE_FACTOR_OVERRIDES[args.vae_factor], vae_steps=args.vae_steps, vae_lr=args.vae_lr,
                                    unet_steps=args.unet_steps, controlnet_steps=controlnet_steps,
                                    checker_steps=args.checker_steps, controlnet_lr=args.controlnet_lr, batch_size=args.batch_size, checkpoint_every=100,
                                    target_pseudo_labels=args.target_pseudo_labels, seed=args.seed, **config_overrides)
        stage_s = time.monotonic()
        torch.manual_seed(args.seed)
        train_maskgen(sources, targets, list(ORGANS), work / "model", config, source_prompt=SOURCE, target_prompt=TARGET)
        timings[f"train to controlnet step {controlnet_steps}"] = time.monotonic() - stage_s
        stage_s = time.monotonic()
        stages[controlnet_steps] = evaluate_stage(work / "model", masks, classifier, args, work / f"synthetic_{controlnet_steps}")
        timings[f"evaluate at controlnet step {controlnet_steps}"] = time.monotonic() - stage_s
        print(f"controlnet step {controlnet_steps}: " + json.dumps({k: v for k, v in stages[controlnet_steps].items() if k != "pairs"}), flush=True)

    final_steps = args.controlnet_steps[-1]
    final = stages[final_steps]
    # the generator cannot be more faithful than its VAE: real B of the masks encoded and decoded
    vae = MaskGenModel.load(work / "model").vae
    with torch.no_grad():
        reconstructed = [vae.decode_stage_2_outputs(vae.encode_stage_2_inputs(render(l, LUT_B, 2000 + s)[None].float()))[0]
                         for s, l in enumerate(mask_labels)]
    dice_rows(rows, "VAE reconstruction of real B of the masks (generator ceiling)", mean_dice(classifier, reconstructed, mask_labels))
    if 0 in stages:
        dice_rows(rows, "generated B, ControlNet untrained", stages[0]["dice"])
    dice_rows(rows, f"generated B, ControlNet {final_steps} steps", final["dice"], ">= 0.8")
    if final["accepted_dice"] is not None:
        dice_rows(rows, f"accepted generated B, ControlNet {final_steps} steps", final["accepted_dice"])
    for controlnet_steps, stage in stages.items():
        rows.append({"check": f"masks with >= 1 accepted candidate, ControlNet {controlnet_steps} steps", "value": stage["masks_accepted"],
                     "target": "rises with steps"})
        rows.append({"check": f"candidates passing the thresholds, ControlNet {controlnet_steps} steps",
                     "value": stage["candidates_passing"], "target": "rises with steps"})
        rows.append({"check": f"checker avg IoU of candidates, ControlNet {controlnet_steps} steps", "value": stage["checker_avg_iou"],
                     "target": ""})
        for name, value, lut_value in zip(("background", *ORGANS), stage["class_means"], LUT_B):
            rows.append({"check": f"generated B mean intensity in the {name} mask, ControlNet {controlnet_steps} steps", "value": value,
                         "target": f"B's {lut_value}"})
        rows.append({"check": f"candidates in A's contrast (background nearer A's than B's), ControlNet {controlnet_steps} steps",
                     "value": stage["in_source_contrast"], "target": ""})
        if stage["accepted_in_source_contrast"] is not None:
            rows.append({"check": f"accepted candidates in A's contrast, ControlNet {controlnet_steps} steps",
                         "value": stage["accepted_in_source_contrast"], "target": ""})
    checker = load_checker(work / "model" / "checker")
    real_scores = [score_candidates(checker, render(label, LUT_B, 2000 + seed)[None], label, list(ORGANS), mask_id=f"m{seed}")[0]
                   for seed, label in enumerate(mask_labels)]
    rows.append({"check": "checker avg IoU on real B of the masks (its ceiling)", "value": statistics.mean(s.avg_iou for s in real_scores),
                 "target": ""})
    rows.append({"check": "real B of the masks passing the thresholds", "value": statistics.mean(not THRESHOLDS.failures(s) for s in real_scores),
                 "target": ""})
    with torch.no_grad():
        # what --target-pseudo-labels hands the ControlNet: the checker's labels of the B training images
        dice_rows(rows, "checker on the real B training images (its pseudo-labels)",
                  mean_dice(lambda image: checker(image[None].float())[0].argmax(0), targets, target_labels))

    if args.segmenter_steps and final["pairs"]:
        stage_s = time.monotonic()
        synthetic_images = [load_volume(image) for image, _ in final["pairs"]]
        synthetic_labels = [load_volume(label, label=True) for _, label in final["pairs"]]
        torch.manual_seed(0)
        on_synthetic = segmenter_dice(train_segmenter(synthetic_images, synthetic_labels, args.segmenter_steps), reference_images, reference_labels)
        torch.manual_seed(0)
        on_a = segmenter_dice(train_segmenter([image for image, _ in sources], [label for _, label in sources], args.segmenter_steps),
                              reference_images, reference_labels)
        dice_rows(rows, f"segmenter trained on {len(synthetic_images)} accepted synthetic B, tested on real B", on_synthetic,
                  "> raw-A segmenter")
        dice_rows(rows, f"segmenter trained on {len(sources)} raw A, tested on real B", on_a)
        timings["segmenters (c)"] = time.monotonic() - stage_s

    timings["total"] = time.monotonic() - started_s
    for what, seconds in timings.items():
        rows.append({"check": f"time: {what} (s)", "value": seconds, "target": ""})
    settings = {key: value for key, value in vars(args).items()}
    settings.update(lut_a=LUT_A, lut_b=LUT_B, thresholds=dataclasses.asdict(THRESHOLDS), unet_attention=config.unet_attention,
                    classifier="per-class 1D Gaussian fitted on the labelled real B references")
    write_results(args.results or ("maskgen_fidelity_pseudolabels_cpu" if args.target_pseudo_labels else "maskgen_fidelity_cpu"),
                  rows, settings)


if __name__ == "__main__":
    main()
