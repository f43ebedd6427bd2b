"""One training loop for every diffusion family: AMP, EMA, gradient accumulation and clipping,
atomic checkpoints with bit-exact resume, DDP under ``torchrun``, progress and cancellation.

The family supplies only ``loss_fn(model, batch) -> scalar loss``. The trainer passes the module it
trains (wrapped in ``DistributedDataParallel`` under torchrun, so the loss must call *that* argument,
not a captured copy, for gradients to be synchronised); frozen parts (VAE, UNet under a ControlNet)
may be captured by the closure.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.utils import convert_to_tensor
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, default_collate

from medgen.diffusion.checkpoint import latest_checkpoint, load_newest_readable, save_checkpoint
from medgen.diffusion.distributed import DistContext, dist_context_from_env, shard_indices
from medgen.errors import BadInputError, CancelledError, ModelError, OutOfMemoryError, is_out_of_memory
from medgen.io.folder_lock import exclusive_folder
from medgen.progress import NullReporter, Reporter, as_reporter

LossFn = Callable[[nn.Module, Any], torch.Tensor]
#: rank offset of the DataLoader seed (seed + epoch + stride * rank): distinct for runs below a million epochs
LOADER_SEED_RANK_STRIDE = 1_000_003
#: settings a resumed run must share with its checkpoint: with them the data position and the per-rank random
#: states are computed, so a change would silently re-use or skip data
RESUME_INVARIANTS = ("batch_size", "grad_accum_steps", "seed", "shuffle")


@dataclass
class TrainConfig:
    """Settings of one training run.

    Args:
        max_steps: optimiser steps to reach (a resumed run continues up to the same number).
        batch_size: samples per micro-batch on each rank.
        grad_accum_steps: micro-batches per optimiser step; the effective batch is
            ``batch_size * grad_accum_steps * world_size``.
        grad_clip_norm: max global gradient L2 norm; None disables clipping.
        ema_decay: EMA decay per update (DIFF-3: 0.995, MIDiffusion: 0.9999); None disables EMA.
        ema_every: update the EMA after every this many optimiser steps (DIFF-3: 10); a run that ends before its
            first update returns its trained weights as the EMA model (without averaging them in).
        amp: bf16 autocast on a CUDA GPU with native bf16 (Ampere or newer; no loss scaling needed); no effect on
            CPU or older GPUs, which train in float32 (see :func:`amp_applies`).
        checkpoint_every: steps between checkpoints; one is always written at ``max_steps``.
        keep_checkpoints: newest checkpoints kept on disk.
        seed: seeds torch's global RNG (offset by rank) and the data order.
        shuffle: reshuffle the data every epoch.
        num_workers: DataLoader worker processes; a resume is bit-identical only with 0, because the
            batch-to-worker assignment (and so each item's worker RNG) shifts when a run starts mid-epoch.
        train_mode: run the model in ``train()`` mode; False keeps it in ``eval()`` mode, so frozen
            BatchNorm statistics and dropout stay as pretrained (parameter-efficient fine-tuning, FSEFT).
    """

    max_steps: int
    batch_size: int = 1
    grad_accum_steps: int = 1
    grad_clip_norm: float | None = 1.0
    ema_decay: float | None = None
    ema_every: int = 1
    amp: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    train_mode: bool = True


@dataclass
class TrainResult:
    """What a finished (or already complete) run hands back.

    Args:
        step: optimiser steps completed.
        last_loss: mean micro-batch loss of the last step: run here, or recorded in the checkpoint a run continued
            from when no step was left to run (None when neither is known).
        ema_model: the EMA copy of the model (eval mode, same class), for sampling; None without EMA.
        checkpoint: the latest checkpoint directory, or None without ``checkpoint_dir``.
    """

    step: int
    last_loss: float | None
    ema_model: nn.Module | None
    checkpoint: Path | None


def _micro_batches(
    dataset: Dataset, config: TrainConfig, context: DistContext, first_micro_batch: int, collate_fn: Callable
):
    """Endless stream of micro-batches for this rank, starting at global micro-batch ``first_micro_batch``.

    The order is a function of (seed, epoch) only, so a resumed run skips straight to its place.
    """
    per_epoch = len(dataset) // context.world_size // config.batch_size
    if per_epoch == 0:
        raise BadInputError(
            f"The dataset has {len(dataset)} samples, fewer than batch_size {config.batch_size} x "
            f"{context.world_size} process(es): add data or lower the batch size."
        )
    epoch, skip = divmod(first_micro_batch, per_epoch)
    while True:
        indices = shard_indices(len(dataset), epoch, config.seed, context, config.shuffle)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=indices[skip * config.batch_size :],
            collate_fn=collate_fn,
            drop_last=True,
            num_workers=config.num_workers,
            # its own generator, so creating a loader never draws from the global RNG the loss uses; one per
            # rank, so worker augmentations differ between ranks
            generator=torch.Generator().manual_seed(config.seed + epoch + LOADER_SEED_RANK_STRIDE * context.rank),
        )
        yield from loader
        epoch, skip = epoch + 1, 0


def _rng_state(device: torch.device) -> dict[str, Any]:
    """The global generators this rank draws from: the CPU's, and its own GPU's when it trains on one (touching
    CUDA for a CPU run would start a CUDA context on a GPU machine)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`_rng_state`. Checkpoints of earlier versions hold a list with one state per visible GPU:
    the training device's entry is taken, so a machine with fewer GPUs can resume them."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        saved = state["cuda"]
        if isinstance(saved, (list, tuple)):
            index = device.index or 0
            if index >= len(saved):
                return  # written on a machine without this GPU: its stream starts afresh
            saved = saved[index]
        torch.cuda.set_rng_state(saved, device)


def amp_applies(config: TrainConfig, device: torch.device) -> bool:
    """bfloat16 autocast runs when asked for on a GPU with native bfloat16 (compute capability 8, Ampere, or newer).
    Older GPUs (V100, T4, RTX 20xx) only emulate it, slower than float32, so they train in float32."""
    return config.amp and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8


def _make_ema(model: nn.Module, decay: float) -> AveragedModel:
    # torch's AveragedModel: the first update copies the weights, later ones do
    # ema = decay * ema + (1 - decay) * weights.
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _optimizer_step(
    trained_model: nn.Module,
    loss_fn: LossFn,
    batches,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
) -> float:
    """Accumulate ``grad_accum_steps`` micro-batches, clip, step; returns the mean micro-batch loss."""
    optimizer.zero_grad(set_to_none=True)
    use_amp = amp_applies(config, device)
    loss_sum = torch.zeros((), device=device)
    for micro in range(config.grad_accum_steps):
        batch = convert_to_tensor(next(batches), device=device)
        last_micro = micro == config.grad_accum_steps - 1
        # DDP all-reduces gradients on every backward unless told not to; only the last one needs it.
        skip_sync = not last_micro and isinstance(trained_model, DistributedDataParallel)
        sync = trained_model.no_sync() if skip_sync else nullcontext()
        with sync:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = loss_fn(trained_model, batch)
            (loss / config.grad_accum_steps).backward()
        loss_sum += loss.detach().float()
    parameters = [parameter for parameter in trained_model.parameters() if parameter.grad is not None]
    if config.grad_clip_norm is not None:
        gradient_norm = torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip_norm)
    else:
        norms = [torch.linalg.vector_norm(parameter.grad.detach().float()) for parameter in parameters]
        gradient_norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if not bool(torch.isfinite(gradient_norm)):
        # one NaN gradient would write NaN into every weight (clipping scales all of them by it), the EMA and the
        # next checkpoint; the loss of this step was still finite. (DDP ranks hold the same reduced gradients.)
        raise ModelError(
            f"The gradients of a training step became {float(gradient_norm)} (the loss was {float(loss_sum) / (micro + 1):.4g}): "
            "lower the learning rate, turn AMP off, or check the data range. The last checkpoint is kept."
        )
    optimizer.step()
    return loss_sum.item() / config.grad_accum_steps


def capped_batch_size(requested: int, available: int, reporter: Reporter | None = None, what: str = "training volumes") -> int:
    """``requested``, or ``available`` when the data hold fewer items, which is logged: a micro-batch cannot hold
    more items than there are, and a batch setting meant for a large dataset should still run on a few volumes."""
    if requested <= available:
        return requested
    as_reporter(reporter).log(f"Batch size {requested} is more than the {available} {what}: using {available}.")
    return available


def train_diffusion(
    model: nn.Module,
    loss_fn: LossFn,
    dataset: Dataset | Sequence,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    collate_fn: Callable | None = None,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train ``model`` for ``config.max_steps`` optimiser steps, continuing the run in ``checkpoint_dir`` if any.

    Runs on the device of ``model``'s parameters. Under ``torchrun`` call
    :func:`medgen.diffusion.distributed.init_distributed` first and move the model to its device; the
    trainer then wraps it in ``DistributedDataParallel`` and shards the data by rank. Resuming restores
    weights, EMA, optimizer, LR scheduler and RNG states and the data position, so on CPU the continued
    run is bit-identical to an uninterrupted one when ``loss_fn`` draws randomness from torch's global RNG.

    Args:
        model: the trainable module (e.g. a MONAI ``DiffusionModelUNet`` or ``ControlNet``).
        loss_fn: ``loss_fn(model, batch) -> scalar``, mean-reduced over the micro-batch.
        dataset: map-style dataset; items are collated into micro-batches of ``config.batch_size``.
        optimizer: optimiser over the trainable parameters of ``model``.
        config: see :class:`TrainConfig`.
        checkpoint_dir: where checkpoints go (see :mod:`medgen.diffusion.checkpoint`); None = none.
            The run continues from the latest checkpoint there, if any; use a new folder for a new run.
        lr_scheduler: stepped once per optimiser step.
        collate_fn: batches a list of items (default: torch's ``default_collate``).
        reporter: progress ``("training", step, max_steps, loss=..., lr=...)`` per step from rank 0
            (the reporter adds the ETA); ``check_cancelled()`` between steps on every rank.

    Raises:
        CancelledError: cancelled between steps; the last checkpoint on disk stays intact.
        OutOfMemoryError: the GPU ran out of memory during a step.
        ModelError: the loss became NaN/inf, or a checkpoint does not fit the model.
        BadInputError: a dataset smaller than one batch per process.
    """
    _check_settings(config)
    reporter = as_reporter(reporter)
    context = dist_context_from_env()
    if context.is_distributed and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise BadInputError(
            f"WORLD_SIZE={context.world_size} (a torchrun launch) but no process group: call "
            "medgen.diffusion.init_distributed() before training (docs/diffusion.md, 'Several GPUs')."
        )
    held = exclusive_folder(checkpoint_dir, "checkpoint folder") if checkpoint_dir is not None and context.is_main else None
    with held or nullcontext():  # a second trainer on this folder would delete this one's checkpoints as it prunes
        return _train(model, loss_fn, dataset, optimizer, config, context, checkpoint_dir, lr_scheduler, collate_fn, reporter)


def _check_settings(config: TrainConfig) -> None:
    """:class:`BadInputError` for settings that would fail deep inside torch or train wrongly (a negative clip norm
    scales gradients by a negative factor: gradient ascent)."""
    counts = (config.max_steps, config.batch_size, config.grad_accum_steps, config.ema_every, config.checkpoint_every,
              config.keep_checkpoints)
    whole = all(isinstance(count, int) and not isinstance(count, bool) for count in counts)
    if not whole or config.max_steps < 0 or min(counts[1:]) < 1:
        raise BadInputError(
            f"Invalid training settings {asdict(config)}: need whole numbers max_steps >= 0 and batch_size, "
            "grad_accum_steps, ema_every, checkpoint_every, keep_checkpoints >= 1."
        )
    if config.grad_clip_norm is not None and not 0 < config.grad_clip_norm < math.inf:
        raise BadInputError(f"grad_clip_norm must be a positive number (or None: no clipping); got {config.grad_clip_norm}.")
    if config.ema_decay is not None and not 0 < config.ema_decay < 1:
        raise BadInputError(f"ema_decay must lie in (0, 1) (or None: no EMA); got {config.ema_decay}.")


def _train(model, loss_fn, dataset, optimizer, config, context, checkpoint_dir, lr_scheduler, collate_fn, reporter) -> TrainResult:
    """The body of :func:`train_diffusion`, with its settings checked and its checkpoint folder held."""
    progress_reporter = reporter if context.is_main else NullReporter()
    device = next(model.parameters()).device
    torch.manual_seed(config.seed + context.rank)
    ema = _make_ema(model, config.ema_decay) if config.ema_decay is not None else None

    start_step, last_loss = 0, None
    found = load_newest_readable(checkpoint_dir, lambda message: progress_reporter.log(message, "warning"),
                                 repair=context.is_main) if checkpoint_dir is not None else None
    _check_same_checkpoint_on_every_rank(found[0] if found else None, context)
    if found is not None:
        checkpoint, loaded = found
        start_step = _resume(checkpoint, loaded, model, ema, optimizer, lr_scheduler, context, config, progress_reporter)
        recorded = loaded[3].get("loss")  # the loss of the step it stopped at, for a run with no step left to run
        last_loss = float(recorded) if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) else None
        progress_reporter.log(f"Resumed from {checkpoint} at step {start_step} of {config.max_steps}.")

    trained_model = model
    if context.is_distributed:
        trained_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    first_micro_batch = start_step * config.grad_accum_steps
    batches = _micro_batches(dataset, config, context, first_micro_batch, collate_fn or default_collate)
    model.train(config.train_mode)
    unused = len(dataset) % (context.world_size * config.batch_size)
    if unused and not config.shuffle:
        progress_reporter.log(
            f"{unused} of {len(dataset)} item(s) are never trained on: without shuffling, each epoch drops the same "
            f"last items that do not fill a batch of {config.batch_size} on each of {context.world_size} process(es).",
            "warning",
        )
    started_s = time.monotonic()
    for step in range(start_step + 1, config.max_steps + 1):
        _check_cancelled_on_every_rank(reporter, context, device)
        try:
            last_loss = _optimizer_step(trained_model, loss_fn, batches, optimizer, config, device)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error) or isinstance(error, OutOfMemoryError):  # MedGen's own (LMI) says more
                raise
            amp_on = amp_applies(config, device)
            raise OutOfMemoryError(
                f"Out of {device.type.upper()} memory in training step {step} (batch size {config.batch_size}, "
                f"AMP {'on' if amp_on else 'off'}). Use a smaller patch or batch size (raise grad_accum_steps "
                f"to keep the effective batch){'' if amp_on or config.amp or device.type != 'cuda' else ' or turn AMP on'}."
            ) from error
        last_loss = _mean_over_ranks(last_loss, context, device)  # every rank sees the same NaN and stops with it
        if not math.isfinite(last_loss):
            raise ModelError(
                f"The training loss became {last_loss} at step {step}: lower the learning rate or check the data range."
            )
        if lr_scheduler is not None:
            lr_scheduler.step()
        if ema is not None and step % config.ema_every == 0:
            ema.update_parameters(model)
        learning_rate = optimizer.param_groups[0]["lr"]
        progress_reporter.progress("training", step, config.max_steps, loss=last_loss, lr=learning_rate)
        if checkpoint_dir is not None and (step % config.checkpoint_every == 0 or step == config.max_steps):
            elapsed_s = time.monotonic() - started_s
            _save(checkpoint_dir, step, model, ema, optimizer, lr_scheduler, config, context, last_loss, elapsed_s)

    ema_model = None
    if ema is not None:
        # A run shorter than ema_every never averaged: its EMA still holds the initial weights, so the trained weights
        # stand in for it. They do not enter the average, so a longer run continued from here equals an uninterrupted one.
        ema_model = (ema.module if int(ema.n_averaged) > 0 else copy.deepcopy(model)).eval()
    final_checkpoint = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    return TrainResult(
        step=max(start_step, config.max_steps),
        last_loss=last_loss,
        ema_model=ema_model,
        checkpoint=final_checkpoint,
    )


def _check_cancelled_on_every_rank(reporter: Reporter, context: DistContext, device: torch.device) -> None:
    """``reporter.check_cancelled()``, agreed between ranks: a cancel seen by any rank stops them all at this
    step (a rank that stopped alone would leave the others waiting in the next all-reduce)."""
    if not context.is_distributed:
        reporter.check_cancelled()
        return
    try:
        reporter.check_cancelled()
        cancelled = 0.0
    except CancelledError:
        cancelled = 1.0
    flag = torch.tensor([cancelled], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item():
        raise CancelledError("Training was cancelled.")


def _check_same_checkpoint_on_every_rank(checkpoint: Path | None, context: DistContext) -> None:
    """:class:`ModelError` when the ranks chose different checkpoints to continue from (one passed over a file the
    others could read): they would train different weights and wait for each other at different steps."""
    if not context.is_distributed:
        return
    name = checkpoint.name if checkpoint is not None else ""
    names: list = [None] * context.world_size
    torch.distributed.all_gather_object(names, name)
    if len(set(names)) > 1:
        raise ModelError(f"The processes chose different checkpoints to continue from ({names}): the folder changed "
                         "while they read it, or one could not read its files. Start the run again.")


def _mean_over_ranks(loss: float, context: DistContext, device: torch.device) -> float:
    """The step's loss averaged over the ranks (NaN on any rank makes it NaN on all)."""
    if not context.is_distributed:
        return loss
    total = torch.tensor([loss], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return total.item() / context.world_size


def _check_same_schedule(checkpoint: Path, info: dict, config: TrainConfig, context: DistContext) -> None:
    """Refuse to resume with another process count or data schedule (see :data:`RESUME_INVARIANTS`)."""
    saved = {name: info.get("config", {}).get(name) for name in RESUME_INVARIANTS}
    saved["processes"] = info.get("world_size")
    now = {name: getattr(config, name) for name in RESUME_INVARIANTS} | {"processes": context.world_size}
    changed = [f"{name} {saved[name]} -> {now[name]}" for name in now if saved[name] is not None and saved[name] != now[name]]
    if changed:
        raise BadInputError(
            f"Checkpoint {checkpoint} was written with other settings ({', '.join(changed)}). The data position and "
            "each process's random state follow from them, so the run continues only with the same ones; start a new "
            "run folder to change them."
        )


def _resume(checkpoint: Path, loaded: tuple, model, ema, optimizer, lr_scheduler, context: DistContext,
            config: TrainConfig, reporter: Reporter) -> int:
    """Restore weights, EMA, optimizer, LR scheduler and this rank's RNG from ``loaded``, what
    :func:`load_checkpoint` read from ``checkpoint``; returns the step to continue from."""
    model_state, ema_state, trainer_state, info = loaded
    _check_same_schedule(checkpoint, info, config, context)
    try:
        model.load_state_dict(model_state)
        if ema is not None and ema_state is not None:
            ema.module.load_state_dict(ema_state)
            ema.n_averaged.fill_(int(trainer_state["ema_updates"]))
    except RuntimeError as error:
        raise ModelError(f"Checkpoint {checkpoint} does not fit this model: {error}") from error
    try:
        # settings this optimizer does not have mean another optimizer class (a newer torch may add settings)
        current_groups = optimizer.state_dict()["param_groups"]
        saved_groups = trainer_state["optimizer"]["param_groups"]
        foreign = {key for saved, current in zip(saved_groups, current_groups) for key in set(saved) - set(current)}
        if foreign:
            raise ValueError(f"its parameter groups hold settings this optimizer lacks: {sorted(foreign)}")
        optimizer.load_state_dict(trainer_state["optimizer"])
        if lr_scheduler is not None and "lr_scheduler" in trainer_state:
            lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
        elif lr_scheduler is not None:
            reporter.log(f"Checkpoint {checkpoint} holds no learning-rate schedule: the schedule starts from its first "
                         "step, not where the run stopped.", "warning")
        saved_rng = trainer_state["rng"]  # a list with one state per rank after a DDP run
        step = int(trainer_state["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(
            f"Checkpoint {checkpoint} was written by another optimizer or for another set of trainable parameters "
            f"({type(error).__name__}: {error}); start a new run folder."
        ) from error
    _restore_rng_state(saved_rng[context.rank] if isinstance(saved_rng, list) else saved_rng, next(model.parameters()).device)
    return step


def _save(checkpoint_dir, step, model, ema, optimizer, lr_scheduler, config, context, loss, elapsed_s) -> None:
    """Gather every rank's RNG state, then write the checkpoint from rank 0 only."""
    rng = _rng_state(next(model.parameters()).device)
    if context.is_distributed:
        rng_per_rank: list = [None] * context.world_size
        torch.distributed.all_gather_object(rng_per_rank, rng)
        rng = rng_per_rank
    if context.is_main:
        _write(checkpoint_dir, step, model, ema, optimizer, lr_scheduler, config, context, loss, elapsed_s, rng)
    if context.is_distributed:
        torch.distributed.barrier()  # no rank runs ahead of a checkpoint it might resume from


def _write(checkpoint_dir, step, model, ema, optimizer, lr_scheduler, config, context, loss, elapsed_s, rng) -> None:
    trainer_state = {"step": step, "optimizer": optimizer.state_dict(), "rng": rng}
    if lr_scheduler is not None:
        trainer_state["lr_scheduler"] = lr_scheduler.state_dict()
    if ema is not None:
        trainer_state["ema_updates"] = int(ema.n_averaged)
    save_checkpoint(
        checkpoint_dir,
        step,
        model.state_dict(),
        trainer_state,
        info={
            "loss": loss,
            "elapsed_s": round(elapsed_s, 3),
            "world_size": context.world_size,
            "config": asdict(config),
        },
        # an EMA that has not averaged yet holds nothing (its first update copies the weights): no file, so that
        # load_trained_weights takes the trained weights, as TrainResult.ema_model does
        ema_state=ema.module.state_dict() if ema is not None and int(ema.n_averaged) > 0 else None,
        keep_last=config.keep_checkpoints,
    )
