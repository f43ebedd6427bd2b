"""Process-group helpers for training under ``torchrun`` (one process per GPU).

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python`` run has none of them
and is rank 0 of 1. Only rank 0 writes checkpoints and reports progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from medgen.devices import cuda_usable, select_device
from medgen.errors import BadInputError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) training job.

    Args:
        rank: global index of this process, 0 <= rank < world_size.
        world_size: number of processes.
        local_rank: index of this process on its machine; selects ``cuda:local_rank``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that writes checkpoints and reports progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def dist_context_from_env(environ: Mapping[str, str] | None = None) -> DistContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun`` (defaults: rank 0 of 1).

    Raises:
        BadInputError: non-integer values, or a rank outside ``[0, WORLD_SIZE)``.
    """
    environ = os.environ if environ is None else environ
    try:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local_rank = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as error:
        raise BadInputError(
            f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}. Launch with torchrun."
        ) from error
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise BadInputError(
            f"Inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}; "
            "expected 0 <= RANK < WORLD_SIZE."
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on CPU) and pick this rank's device.

    A single-process run returns rank 0 of 1 and ``select_device(device_name)`` without touching
    ``torch.distributed``.

    Args:
        device_name: ``auto``, ``cpu`` or ``cuda``; under torchrun CUDA means ``cuda:LOCAL_RANK``.
    """
    context = dist_context_from_env()
    device = select_device(device_name)
    if not context.is_distributed:
        return context, device
    if device.type == "cuda" and cuda_usable():
        device = torch.device(f"cuda:{context.local_rank}")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return context, device


def shard_indices(num_items: int, epoch: int, seed: int, context: DistContext, shuffle: bool = True) -> list[int]:
    """This rank's dataset indices for one epoch: a seeded permutation split evenly across ranks.

    Uses torch's ``DistributedSampler`` (``drop_last=True``: every rank gets ``num_items // world_size``
    items, none repeated), so the order depends only on ``(seed, epoch)`` and a resumed run can find
    its place again.
    """
    sampler = DistributedSampler(
        range(num_items),
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=True,
    )
    sampler.set_epoch(epoch)
    return list(sampler)
