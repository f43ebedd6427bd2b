"""Training checkpoints that survive a kill at any moment.

Layout of ``checkpoint_dir``::

    step_00001000/model.safetensors   trained weights
    step_00001000/ema.safetensors     EMA weights (when EMA is on), same keys: load into a fresh network
    step_00001000/trainer_state.pt    optimizer, LR scheduler, RNG states (torch.save; read with weights_only=True)
    step_00001000/info.json           step, loss, config: for people and the UI
    latest.json                       {"step": 1000, "directory": "step_00001000"}

A checkpoint is written into a hidden temporary directory, renamed into place, and only then named
in ``latest.json`` (itself replaced atomically), so an interruption leaves the previous one usable.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medgen.errors import ModelError, is_out_of_memory
from medgen.io.atomic import ensure_folder, flush_to_disk, write_text_atomic

LATEST_FILE = "latest.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.pt"
INFO_FILE = "info.json"


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in state.items()}


#: what a damaged checkpoint's message advises when no older one could stand in for it
START_AFRESH = "with no older intact checkpoint beside it, start afresh in a new folder."


class DamagedCheckpointError(ModelError):
    """A checkpoint whose files are missing, cut short or not what this trainer writes (the disk itself answered):
    a resume may pass over it to an older one. ``cause`` is the message without the advice to start afresh, for
    the warning of a resume that passed over it."""

    def __init__(self, cause: str) -> None:
        super().__init__(f"{cause}; {START_AFRESH}")
        self.cause = cause


def save_checkpoint(
    checkpoint_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    info: dict[str, Any],
    ema_state: dict[str, torch.Tensor] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write one checkpoint atomically, point ``latest.json`` at it and prune older ones.

    Args:
        checkpoint_dir: folder holding all checkpoints of one training run (created if missing).
        step: optimiser steps completed.
        model_state, ema_state: ``state_dict()`` of the trained module and of the EMA copy.
        trainer_state: tensors, numbers, strings, lists and dicts only (``weights_only`` loadable).
        info: JSON-serialisable summary.
        keep_last: number of newest checkpoints to keep (>= 1).

    Returns:
        the checkpoint directory.
    """
    checkpoint_dir = ensure_folder(checkpoint_dir)
    name = f"step_{step:08d}"
    temporary = checkpoint_dir / f".tmp_{name}_{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file(_cpu_state(model_state), str(temporary / MODEL_FILE))
    if ema_state is not None:
        save_file(_cpu_state(ema_state), str(temporary / EMA_FILE))
    torch.save(trainer_state, temporary / STATE_FILE)
    (temporary / INFO_FILE).write_text(json.dumps({"step": step, **info}, indent=2, default=str))
    for written in temporary.iterdir():
        flush_to_disk(written)
    target = checkpoint_dir / name
    superseded = checkpoint_dir / f".old_{name}_{os.getpid()}"
    if target.exists():
        # left by a writer killed between its rename and latest.json, then re-reached after the resume;
        # a directory cannot be replaced in one rename, so move it aside first
        os.replace(target, superseded)
    os.replace(temporary, target)
    _point_latest_at(checkpoint_dir, target)
    # Leftovers of killed writers go: hidden names, and checkpoints of later steps than this one (written by a
    # run killed before it named them in latest.json; this run continued from an earlier step). Of the older
    # checkpoints, the newest keep_last - 1 stay next to this one.
    stale = [*checkpoint_dir.glob(".tmp_step_*"), *checkpoint_dir.glob(".old_step_*")]
    others = sorted((_step_of(path), path) for path in checkpoint_dir.glob("step_*") if _step_of(path) is not None)
    later = [path for other_step, path in others if other_step > step]
    older = [path for other_step, path in others if other_step < step]
    for old in stale + later + older[: max(0, len(older) - (max(1, keep_last) - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _step_of(path: Path) -> int | None:
    """The step of a ``step_XXXXXXXX`` checkpoint directory (None for other names)."""
    digits = path.name.removeprefix("step_")
    return int(digits) if digits.isdigit() else None


def _named_by_latest(checkpoint_dir: Path) -> Path | None:
    """The directory ``latest.json`` names (it may be missing or damaged), or None without ``latest.json``."""
    latest_file = checkpoint_dir / LATEST_FILE
    if not latest_file.is_file():
        return None
    try:
        name = json.loads(latest_file.read_text())["directory"]
        if not isinstance(name, str) or Path(name).name != name or _step_of(Path(name)) is None:
            raise ValueError(f"'directory' must name a step_XXXXXXXX folder of this run, found {name!r}")
    except (ValueError, KeyError, TypeError) as error:
        raise ModelError(
            f"{latest_file} is not a valid checkpoint pointer ({error}); the run folder was altered: use a new folder "
            "to start afresh."
        ) from error
    return checkpoint_dir / name


def resume_candidates(checkpoint_dir: str | Path) -> list[Path]:
    """Checkpoint directories a run may continue from, best first: the one ``latest.json`` names, then the older
    ones kept beside it (``keep_last`` > 1), to fall back on when it cannot be read. Without ``latest.json`` (a
    writer killed between renaming its first checkpoint into place and naming it), every step directory, newest
    first: each was complete before its rename.

    Raises:
        ModelError: ``latest.json`` is not a valid pointer.
    """
    checkpoint_dir = Path(checkpoint_dir)
    found = sorted(((step, path) for path in checkpoint_dir.glob("step_*") if (step := _step_of(path)) is not None),
                   reverse=True)
    named = _named_by_latest(checkpoint_dir)
    if named is None:
        return [path for _, path in found]
    return [named, *(path for step, path in found if step < _step_of(named))]


def load_newest_readable(checkpoint_dir: str | Path, warn, repair: bool = False
                         ) -> tuple[Path, tuple[dict, dict | None, dict, dict]] | None:
    """``(directory, load_checkpoint(directory))`` of the first of :func:`resume_candidates` that is not damaged,
    or None when the folder holds no checkpoint; ``warn(message)`` names each damaged one passed over. With
    ``repair`` (the one process that writes checkpoints), ``latest.json`` is pointed at the one chosen, so that the
    run's result and :func:`load_trained_weights` find it too.

    Raises:
        ModelError: every candidate is damaged (the first one's error), a read failed for a reason other than
            damage (a disk error: nothing is passed over then), or ``latest.json`` is not a valid pointer.
    """
    checkpoint_dir = Path(checkpoint_dir)
    damaged = []
    for candidate in resume_candidates(checkpoint_dir):
        try:
            loaded = load_checkpoint(candidate)
        except DamagedCheckpointError as error:
            damaged.append(error)
            continue
        if damaged:
            warn(f"{' '.join(f'{error.cause}.' for error in damaged)} Continuing from {candidate.name}, the newest "
                 "checkpoint that reads whole.")
        if repair and _named_by_latest(checkpoint_dir) != candidate:
            _point_latest_at(checkpoint_dir, candidate)
        return candidate, loaded
    if damaged:
        raise damaged[0]
    return None


def _point_latest_at(checkpoint_dir: Path, directory: Path) -> None:
    """Name ``directory`` (a ``step_XXXXXXXX`` folder of ``checkpoint_dir``) in ``latest.json``, atomically."""
    write_text_atomic(checkpoint_dir / LATEST_FILE,
                      json.dumps({"step": _step_of(directory), "directory": directory.name}, indent=2))


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The directory named by ``latest.json``, or None when the run has no checkpoint yet."""
    directory = _named_by_latest(Path(checkpoint_dir))
    if directory is None:
        return None
    latest_file = Path(checkpoint_dir) / LATEST_FILE
    if not (directory / MODEL_FILE).is_file():
        raise ModelError(
            f"{latest_file} names {directory.name}, which has no {MODEL_FILE}; the run folder was altered."
        )
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict, dict | None, dict, dict]:
    """Read ``(model_state, ema_state or None, trainer_state, info)`` from one checkpoint directory."""
    directory = Path(directory)
    try:
        model_state = load_file(str(directory / MODEL_FILE))
        ema_path = directory / EMA_FILE
        ema_state = load_file(str(ema_path)) if ema_path.is_file() else None
        trainer_state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        info = json.loads((directory / INFO_FILE).read_text())
    except (OSError, EOFError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        if is_out_of_memory(error):
            raise
        if isinstance(error, pickle.UnpicklingError):  # torch's own text advises loading it unsafely: never
            error_text = "its trainer state holds objects other than tensors and numbers, which are never unpickled"
        else:
            error_text = f"{type(error).__name__}: {error}"
        message = f"Checkpoint {directory} cannot be read ({error_text})"
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            # the disk or the system failed (EIO, too many open files, a network share): the file may be whole
            raise ModelError(f"{message}; try again once the cause is fixed.") from error
        raise DamagedCheckpointError(message) from error
    if not isinstance(trainer_state, dict) or not isinstance(info, dict) or not isinstance(info.get("config", {}), dict):
        raise DamagedCheckpointError(f"Checkpoint {directory} holds no trainer state or info of this trainer")
    if ema_state is None and trainer_state.get("ema_updates"):
        raise DamagedCheckpointError(
            f"Checkpoint {directory} has averaged weights ({trainer_state['ema_updates']} EMA updates) but no "
            f"{EMA_FILE}: the run folder was altered")
    return model_state, ema_state, trainer_state, info


def load_trained_weights(network: nn.Module, checkpoint: str | Path, use_ema: bool = True) -> nn.Module:
    """Load a checkpoint's weights into ``network`` for sampling, preferring the EMA weights.

    Args:
        network: a freshly built module of the trained architecture.
        checkpoint: a checkpoint directory, or a run folder (its latest checkpoint is used).
        use_ema: take ``ema.safetensors`` when present (the usual choice for sampling).

    Raises:
        ModelError: no checkpoint, or weights that do not fit ``network``.
    """
    directory = Path(checkpoint)
    if not (directory / MODEL_FILE).is_file():
        directory = latest_checkpoint(directory)
        if directory is None:
            raise ModelError(f"No checkpoint found in {checkpoint}: expected {MODEL_FILE} or {LATEST_FILE} there.")
    weights_path = directory / EMA_FILE if use_ema and (directory / EMA_FILE).is_file() else directory / MODEL_FILE
    try:
        state = load_file(str(weights_path))
    except (OSError, SafetensorError) as error:
        raise ModelError(f"{weights_path} is missing or corrupted ({error}); re-run the training.") from error
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(f"{weights_path} does not fit {type(network).__name__}: {error}") from error
    return network
