"""Two-process DDP training on CPU (Gloo): ranks stay in sync, only rank 0 writes checkpoints, a cancel seen by
one rank stops both, and a checkpoint of two processes does not resume in one.

Spawns processes (each imports torch and MONAI), hence ``slow``.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CONFIG = dict(max_steps=3, batch_size=2, grad_accum_steps=2, ema_decay=0.9, checkpoint_every=1)


def _toy_run():
    """A time-blind toy denoiser (enough to exercise gradient sync), its loss and data; same weights on every rank."""
    import torch.nn.functional as F
    from monai.networks.schedulers import DDPMScheduler

    from medgen.diffusion import noise_prediction_loss

    torch.manual_seed(0)  # same initial weights on every rank, as DDP expects
    model = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(4, 1, 3, padding=1))
    scheduler = DDPMScheduler(num_train_timesteps=1000)

    def loss_fn(trained, batch):
        return noise_prediction_loss(lambda x, t: trained(x), scheduler, batch, loss=F.mse_loss)

    return model, loss_fn, [torch.rand(1, 8, 8, 8) for _ in range(8)]


def _join(rank: int, port: int):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from medgen.diffusion import init_distributed

    return init_distributed("cpu")[0]


def _train_rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from medgen.diffusion import TrainConfig, train_diffusion

    context = _join(rank, port)
    model, loss_fn, data = _toy_run()
    rng_at_first_step = []

    def recording_loss(trained, batch):
        if not rng_at_first_step:
            rng_at_first_step.append(torch.get_rng_state())
        return loss_fn(trained, batch)

    result = train_diffusion(model, recording_loss, data, torch.optim.Adam(model.parameters(), lr=1e-2), TrainConfig(**CONFIG),
                             checkpoint_dir=os.path.join(out_dir, "checkpoints"))
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{context.rank}.pt"))
    torch.save({"rng": rng_at_first_step[0], "last_loss": torch.tensor(result.last_loss)}, os.path.join(out_dir, f"run{context.rank}.pt"))
    dist.destroy_process_group()


def _cancel_seen_by_rank0_only(rank: int, port: int, out_dir: str) -> None:
    import itertools

    import torch.distributed as dist

    from medgen.diffusion import TrainConfig, train_diffusion
    from medgen.errors import CancelledError
    from medgen.progress import CallbackReporter

    _join(rank, port)
    model, loss_fn, data = _toy_run()
    checks = itertools.count(1)
    reporter = CallbackReporter(should_stop=lambda: next(checks) >= 2 and rank == 0)  # e.g. a cancel file on one node
    try:
        train_diffusion(model, loss_fn, data, torch.optim.Adam(model.parameters(), lr=1e-2), TrainConfig(**CONFIG),
                        reporter=reporter)
        outcome = "finished"
    except CancelledError:
        outcome = "cancelled"
    with open(os.path.join(out_dir, f"outcome{rank}.txt"), "w") as file:
        file.write(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_stay_in_sync_and_rank0_writes(tmp_path):
    mp.spawn(_train_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE))
    for name, tensor in rank0.items():
        assert torch.equal(tensor, rank1[name]), name
    run0, run1 = (torch.load(tmp_path / f"run{r}.pt", weights_only=True) for r in range(WORLD_SIZE))
    assert not torch.equal(run0["rng"], run1["rng"])  # each rank draws its own noise and timesteps (seed + rank)
    assert torch.equal(run0["last_loss"], run1["last_loss"])  # the loss reported is the mean over the ranks
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".lock", "latest.json", "step_00000002", "step_00000003"]  # .lock: one trainer per folder
    state = torch.load(checkpoints / "step_00000003" / "trainer_state.pt", weights_only=True)
    assert isinstance(state["rng"], list) and len(state["rng"]) == WORLD_SIZE

    from medgen.diffusion import TrainConfig, train_diffusion
    from medgen.errors import BadInputError

    model, loss_fn, data = _toy_run()
    with pytest.raises(BadInputError, match="processes 2 -> 1"):  # its data position and RNG states are per process
        train_diffusion(model, loss_fn, data, torch.optim.Adam(model.parameters()), TrainConfig(**{**CONFIG, "max_steps": 5}),
                        checkpoint_dir=checkpoints)


@pytest.mark.slow
def test_a_cancel_seen_by_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    mp.spawn(_cancel_seen_by_rank0_only, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    assert [(tmp_path / f"outcome{rank}.txt").read_text() for rank in range(WORLD_SIZE)] == ["cancelled", "cancelled"]
