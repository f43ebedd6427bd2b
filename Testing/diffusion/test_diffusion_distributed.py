"""Rank/world-size helpers for torchrun, tested without spawning processes."""

from __future__ import annotations

import pytest

from medgen.diffusion import DistContext, dist_context_from_env, init_distributed, shard_indices
from medgen.errors import BadInputError


def test_dist_context_reads_torchrun_environment():
    assert dist_context_from_env({}) == DistContext(rank=0, world_size=1, local_rank=0)
    context = dist_context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (context.rank, context.world_size, context.local_rank) == (3, 4, 1)
    assert context.is_distributed and not context.is_main
    assert dist_context_from_env({"RANK": "0", "WORLD_SIZE": "2"}).is_main
    # without LOCAL_RANK (processes started by hand on one machine) the local rank is the rank: not all on cuda:0
    assert dist_context_from_env({"RANK": "1", "WORLD_SIZE": "2"}).local_rank == 1
    for broken in ({"RANK": "2", "WORLD_SIZE": "2"}, {"RANK": "x", "WORLD_SIZE": "2"}, {"WORLD_SIZE": "0"}):
        with pytest.raises(BadInputError):
            dist_context_from_env(broken)


def test_single_process_run_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context, device = init_distributed("cpu")
    assert context == DistContext() and device.type == "cpu"


def test_shard_indices_partition_each_epoch():
    ranks = [DistContext(rank=r, world_size=3) for r in range(3)]
    epoch0 = [shard_indices(20, epoch=0, seed=7, context=c) for c in ranks]
    assert all(len(shard) == 20 // 3 for shard in epoch0)
    flat = [i for shard in epoch0 for i in shard]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(20))
    assert epoch0 == [shard_indices(20, epoch=0, seed=7, context=c) for c in ranks]  # reproducible
    assert epoch0 != [shard_indices(20, epoch=1, seed=7, context=c) for c in ranks]  # reshuffled per epoch
    assert shard_indices(5, epoch=0, seed=0, context=DistContext(), shuffle=False) == [0, 1, 2, 3, 4]
