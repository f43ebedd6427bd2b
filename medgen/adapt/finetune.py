"""Few-shot fine-tuning of a segmentation network with any ``medgen.peft`` method (after the FSEFT recipe).

Dice loss on softmax outputs, foreground-balanced random patches, AdamW with a cosine learning-rate
schedule, validation Dice every ``val_every`` steps with early stopping (the best adapter state is
kept). Where it departs from FSEFT's released recipe (spec fseft.md §8): counted in steps, not epochs, with no
warm-up epoch; a small weight decay (1e-4, FSEFT 0) by default; early stopping on validation Dice when a validation
pair is given (FSEFT: a plateau of the smoothed training loss), since a few-shot user rarely trains 200 epochs.
All of it runs on the shared training loop of :mod:`medgen.diffusion` (AMP on GPU, checkpoints with
exact resume, cancellation between steps, progress with loss and ETA). A partly frozen model trains
in ``eval()`` mode (FSEFT: BatchNorm statistics and dropout stay as pretrained); full fine-tuning in
``train()`` mode.

Besides the training checkpoints, ``checkpoint_dir`` holds the validation history
(``finetune_state.json``) and the best state so far (``best_state.safetensors``), so a resumed run
keeps its early-stopping count and returns the best state of the whole run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from monai.data import MetaTensor
from monai.losses import DiceLoss
from monai.transforms import SpatialPad
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medgen.diffusion import TrainConfig, train_diffusion
from medgen.errors import BadInputError, ModelError
from medgen.io import display_name, holds_whole_numbers
from medgen.io.atomic import atomic_output, write_text_atomic
from medgen.io.model_folder import check_same_run
from medgen.metrics import dice_per_class
from medgen.models.segmentation import SegmentationModel, predict_probabilities, prepare_volume
from medgen.models.weights import starting_weights_hash, weights_hash
from medgen.peft import trains_whole_model
from medgen.progress import PhaseReporter, Reporter, as_reporter

#: validation history, best Dice and early-stopping count of a run, next to its checkpoints
STATE_FILE = "finetune_state.json"
#: the tensors of the best validated state (see :func:`_tracked_state`)
BEST_STATE_FILE = "best_state.safetensors"


@dataclasses.dataclass
class FinetuneConfig:
    """Few-shot training settings.

    Args:
        steps: optimiser steps at most.
        batch_size: patches per step, at most one per training pair (capped to their number).
        lr, weight_decay: AdamW settings (cosine decay to 0 over ``steps``).
        foreground_ratio: share of patches centred on a foreground voxel.
        val_every: validate (and checkpoint) every this many steps.
        patience: stop after this many validations without a better Dice.
        amp: bf16 autocast on CUDA GPUs with native bf16 (see :func:`medgen.diffusion.training.amp_applies`).
        seed: data order, patches and noise.
    """

    steps: int = 200
    batch_size: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    foreground_ratio: float = 0.5
    val_every: int = 20
    patience: int = 5
    amp: bool = True
    seed: int = 0


def sample_patch(image: torch.Tensor, label: torch.Tensor, patch: tuple[int, int, int], foreground_ratio: float):
    """One random patch ``(1, *patch)`` of ``image``/``label`` ``(1, D, H, W)``, centred on foreground with
    probability ``foreground_ratio``. Draws from torch's global RNG (so a resumed run repeats it exactly)."""
    size = torch.tensor(image.shape[1:])
    patch_t = torch.tensor(patch)
    if bool((patch_t > size).any()):
        raise BadInputError(f"The training patch {patch} is larger than the volume {tuple(size.tolist())}.")
    foreground = torch.nonzero(label[0] > 0)
    if len(foreground) and float(torch.rand(1)) < foreground_ratio:
        centre = foreground[int(torch.randint(len(foreground), (1,)))]
    else:
        centre = torch.stack([torch.randint(int(s), (1,))[0] for s in size])
    start = (centre - patch_t // 2).clamp(min=torch.zeros(3, dtype=torch.long), max=size - patch_t)
    index = tuple(slice(int(a), int(a) + int(p)) for a, p in zip(start, patch_t))
    return image[(slice(None), *index)], label[(slice(None), *index)]


def _padded_to_patch(image: torch.Tensor, label: torch.Tensor, patch: tuple[int, int, int], number: int, reporter: Reporter):
    """``image``/``label`` ``(C, I, J, K)`` zero-padded (centred) to at least ``patch`` along every axis, as sliding-window
    inference pads a volume smaller than its window (a thick-slice scan of 12 slices for a 16-slice patch)."""
    size = tuple(image.shape[1:])
    if all(length >= edge for length, edge in zip(size, patch)):
        return image, label
    pad = SpatialPad(spatial_size=patch, mode="constant", value=0)
    image, label = pad(image), pad(label)
    reporter.log(f"Training volume {number} {size} is smaller than the training patch {tuple(patch)}: zero-padded to "
                 f"{tuple(image.shape[1:])}, as inference pads it.", "warning")
    return image, label


@dataclasses.dataclass
class FinetuneResult:
    steps: int
    best_val_dice: float | None
    history: list[dict]


def check_segmentation_labels(model: SegmentationModel, label: torch.Tensor, name: str) -> None:
    """:class:`BadInputError` unless ``label`` holds whole numbers, some foreground and only classes ``model`` predicts.

    Args:
        label: label map ``(1, I, J, K)``, integer or float holding whole numbers.
        name: how the map is called in the message (its file name when it came from one).
    """
    if not holds_whole_numbers(label):  # 1.5 would be read as class 1 here and rounded to 2 by prepare_volume
        raise BadInputError(f"{name} holds values that are not whole numbers (or NaN); a segmentation holds class numbers.")
    values = sorted(int(v) for v in torch.unique(label).tolist())
    if not set(values) - {0}:
        raise BadInputError(f"{name} has no labelled voxel (every voxel is 0): it cannot train or score the model.")
    if values[0] < 0 or values[-1] >= model.num_classes:
        raise BadInputError(
            f"{name} has label values {values}, but {model.name} predicts classes 0..{model.num_classes - 1} "
            f"({['background', *model.class_names]}). Remap the segmentation or pick a model with these classes."
        )


def _validation_dice(model: SegmentationModel, prepared, label: torch.Tensor, device) -> float:
    """Mean Dice over the foreground classes drawn in the validation label map ``(1, 1, I, J, K)``.

    Classes the map does not hold are not scored: on a multi-class base the user may label one structure,
    and a class absent from both maps would count as a perfect 1 for a model that misses the structure.
    """
    probabilities = predict_probabilities(model, prepared.tensor, device)
    dice = dice_per_class(probabilities.argmax(1)[0], label[0, 0], model.num_classes)
    drawn = [int(value) for value in torch.unique(label) if value > 0]
    return float(dice[drawn].mean())


@dataclasses.dataclass
class _RunState:
    """What a fine-tuning run knows besides its training checkpoint: validations so far, the best one
    (Dice and tensors) and the validations since it."""

    history: list[dict]
    best_dice: float | None
    best_state: dict[str, torch.Tensor] | None
    stale: int


def _tracked_state(network: torch.nn.Module, train_mode: bool) -> dict[str, torch.Tensor]:
    """The tensors training changes: the trainable parameters, plus every buffer (BatchNorm statistics)
    when it runs in ``train()`` mode."""
    if train_mode:
        return dict(network.state_dict(keep_vars=True))
    return {name: parameter for name, parameter in network.named_parameters() if parameter.requires_grad}


def _load_run_state(checkpoint_dir: Path) -> _RunState:
    """The state :func:`_save_run_state` left in ``checkpoint_dir``, or a fresh one."""
    state_path = checkpoint_dir / STATE_FILE
    if not state_path.is_file():
        return _RunState([], None, None, 0)
    try:
        saved = json.loads(state_path.read_text())
        best_state = load_file(str(checkpoint_dir / BEST_STATE_FILE)) if saved["best_dice"] is not None else None
        return _RunState(saved["history"], saved["best_dice"], best_state, int(saved["stale"]))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        raise ModelError(
            f"The fine-tuning state in {checkpoint_dir} cannot be read ({error}); use a new output folder to start afresh."
        ) from error


def _save_run_state(checkpoint_dir: Path, run: _RunState, improved: bool) -> None:
    """Write the best tensors (when ``improved``), then the history that names them; each file atomically."""
    if improved:
        with atomic_output(checkpoint_dir / BEST_STATE_FILE) as temporary:
            save_file({name: tensor.contiguous() for name, tensor in run.best_state.items()}, str(temporary))
    saved = {"history": run.history, "best_dice": run.best_dice, "stale": run.stale}
    write_text_atomic(checkpoint_dir / STATE_FILE, json.dumps(saved, indent=2))


def finetune_segmentation(
    model: SegmentationModel,
    training: list[tuple[MetaTensor, MetaTensor]],
    config: FinetuneConfig,
    *,
    checkpoint_dir: str | Path,
    validation: tuple[MetaTensor, MetaTensor] | None = None,
    device: torch.device | str = "cpu",
    reporter: Reporter | None = None,
) -> FinetuneResult:
    """Train the trainable parameters of ``model.network`` (inject a PEFT method first) on a few volumes.

    Args:
        model: the segmentation model; only parameters with ``requires_grad`` are optimised.
        training: ``(image, label)`` pairs ``(1, I, J, K)``; label values 0..num_classes-1.
        config: see :class:`FinetuneConfig`.
        checkpoint_dir: checkpoints; an interrupted run there continues where it stopped.
        validation: held-out ``(image, label)`` for early stopping (None: train all ``steps``).
        device: training device.
        reporter: ``training`` progress with loss, ``validation`` Dice logs, cancellation.
    """
    reporter = as_reporter(reporter)
    device = torch.device(device)
    if not training:
        raise BadInputError("Fine-tuning needs at least one training volume with its segmentation.")
    trainable = [p for p in model.network.parameters() if p.requires_grad]
    if not trainable:
        raise BadInputError("The model has no trainable parameters: inject a PEFT method (or 'full') first.")
    prepared = []
    for number, (image, label) in enumerate(training):
        check_segmentation_labels(model, label, display_name(label, f"Training segmentation {number}"))
        inputs, labels = prepare_volume(model, image, label)
        prepared.append(_padded_to_patch(inputs.tensor[0], labels[0], model.patch_size, number, reporter))
    val = None
    if validation is not None:
        # checked before training: a bad validation map would otherwise fail (or mislead early stopping) after it
        check_segmentation_labels(model, validation[1], display_name(validation[1], "The validation segmentation"))
        val_inputs, val_labels = prepare_volume(model, *validation)
        if not bool((val_labels > 0).any()):  # its score would be NaN, and early stopping would act on it
            raise BadInputError(
                f"{display_name(validation[1], 'The validation segmentation')} keeps no labelled voxel on {model.name}'s "
                f"grid {tuple(val_labels.shape[2:])}: its structures are thinner than the model's voxels. Draw them "
                "larger, or leave validation empty.")
        val = (val_inputs, val_labels)
    model.network.to(device)
    loss_function = DiceLoss(to_onehot_y=True, softmax=True)
    patch = model.patch_size

    def loss_fn(network, batch):
        images, labels = zip(*(sample_patch(*prepared[int(i)], patch, config.foreground_ratio) for i in batch))
        logits = network(torch.stack(images).to(device))
        return loss_function(logits.float(), torch.stack(labels).to(device))

    # A resumed run restores the optimiser (its learning rate included) and the whole network from its checkpoint,
    # so a continuation with other settings, data or starting weights (another base model) would silently be the
    # old run; ``steps`` shapes the cosine schedule, so it too must stay. Patience, validation spacing and AMP may change.
    data = {f"{index}.{part}": tensor for index, pair in enumerate(prepared) for part, tensor in zip(("image", "label"), pair)}
    if val is not None:
        data.update({"validation.image": val[0].tensor, "validation.label": val[1]})
    check_same_run(checkpoint_dir, {**dataclasses.asdict(config), "frozen_weights": starting_weights_hash(model.network)},
                   weights_hash(data), may_change=("patience", "val_every", "amp"))
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    train_mode = trains_whole_model(model.network)
    checkpoint_dir = Path(checkpoint_dir)
    run = _load_run_state(checkpoint_dir)
    done = run.history[-1]["step"] if run.history else 0
    whole_run = PhaseReporter(reporter, "training", total=config.steps)  # segments up to each validation, one bar

    def train_to(target: int):
        return train_diffusion(
            model.network, loss_fn, list(range(len(prepared))), optimizer,
            TrainConfig(max_steps=target, batch_size=min(config.batch_size, len(prepared)), amp=config.amp,
                        checkpoint_every=config.val_every, keep_checkpoints=1, seed=config.seed, grad_clip_norm=None,
                        train_mode=train_mode),
            checkpoint_dir=checkpoint_dir, lr_scheduler=schedule, reporter=whole_run,
        )

    def unfinished() -> bool:
        return done < config.steps and not (val is not None and run.stale >= config.patience)

    if done and not unfinished() and run.best_state is None:
        # A finished run without validation, opened again: its weights are in its last checkpoint (no step runs),
        # not in the freshly injected network, which would otherwise be returned (and saved) untrained.
        train_to(done)
    while unfinished():
        result = train_to(min(done + config.val_every, config.steps))
        done = result.step
        entry, improved = {"step": done, "loss": result.last_loss}, False
        if val is not None:
            entry["val_dice"] = _validation_dice(model, val[0], val[1], device)
            reporter.log(f"step {done}: validation Dice {entry['val_dice']:.4f}")
            improved = run.best_dice is None or entry["val_dice"] > run.best_dice
            if improved:
                run.best_dice, run.stale = entry["val_dice"], 0
                run.best_state = {name: tensor.detach().to("cpu", copy=True)
                                  for name, tensor in _tracked_state(model.network, train_mode).items()}
            else:
                run.stale += 1
            if run.stale >= config.patience:
                reporter.log(f"early stop at step {done}: no better validation Dice in {config.patience} checks")
        run.history.append(entry)
        _save_run_state(checkpoint_dir, run, improved)
    if run.best_state is not None:
        with torch.no_grad():
            for name, tensor in _tracked_state(model.network, train_mode).items():
                tensor.copy_(run.best_state[name])
    return FinetuneResult(done, run.best_dice, run.history)
