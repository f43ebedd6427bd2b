"""Training-loop oracles: EMA math, gradient accumulation, bit-identical resume, cancel keeps the
checkpoint, progress events, loading trained weights, and the error mapping (NaN loss, OOM)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from monai.networks.schedulers import DDPMScheduler

from medgen.diffusion import (
    SIGMOID_SCHEDULE,
    TrainConfig,
    latest_checkpoint,
    load_trained_weights,
    noise_prediction_loss,
    train_diffusion,
    unet_denoiser,
)
from medgen.diffusion.checkpoint import load_checkpoint, save_checkpoint
from medgen.errors import BadInputError, CancelledError, ModelError, OutOfMemoryError
from medgen.progress import CallbackReporter

VOLUME = (1, 8, 8, 8)


def volumes(count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(VOLUME, generator=generator) * 2 - 1 for _ in range(count)]


def ddpm_loss(scheduler=None):
    """The latent-DDPM family's loss (L1 on epsilon, sigmoid schedule), random t and noise from the global RNG."""
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE)
    return lambda model, batch: noise_prediction_loss(unet_denoiser(model), scheduler, batch, loss=F.l1_loss)


def adam(model):
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def test_ema_follows_decay_formula(make_tiny_denoiser):
    model = make_tiny_denoiser()
    weights_seen_by_loss: list[torch.Tensor] = []
    loss = ddpm_loss()

    def recording_loss(trained, batch):
        weights_seen_by_loss.append(trained.conv_in.weight.detach().clone())
        return loss(trained, batch)

    config = TrainConfig(max_steps=6, batch_size=2, ema_decay=0.9, ema_every=2)
    result = train_diffusion(model, recording_loss, volumes(4), adam(model), config)

    # weights after step s (1-based) are what the loss saw at step s + 1; the last ones are the model's
    after_step = weights_seen_by_loss[1:] + [model.conv_in.weight.detach()]
    expected = after_step[1]  # first EMA update (step 2) copies the weights
    for step in (4, 6):
        expected = 0.9 * expected + 0.1 * after_step[step - 1]
    torch.testing.assert_close(result.ema_model.conv_in.weight, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(result.ema_model.conv_in.weight, model.conv_in.weight)


def test_grad_accumulation_equals_large_batch(make_tiny_denoiser):
    data = volumes(8)

    def regression_loss(model, batch):  # deterministic, mean-reduced
        return F.mse_loss(model(batch, torch.zeros(batch.shape[0], dtype=torch.long)), 0.5 * batch)

    def train(batch_size: int, accumulation: int):
        model = make_tiny_denoiser(seed=3)
        config = TrainConfig(max_steps=2, batch_size=batch_size, grad_accum_steps=accumulation, grad_clip_norm=None)
        train_diffusion(model, regression_loss, data, torch.optim.SGD(model.parameters(), lr=0.1), config)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    accumulated, large_batch, small_batch = train(2, 2), train(4, 1), train(2, 1)
    torch.testing.assert_close(accumulated, large_batch, rtol=0, atol=1e-6)
    assert not torch.allclose(small_batch, large_batch, atol=1e-6)


def test_resume_is_bit_identical_to_uninterrupted_run(make_tiny_denoiser, tmp_path):
    config = TrainConfig(max_steps=6, batch_size=2, grad_accum_steps=2, ema_decay=0.9, checkpoint_every=2, seed=5)
    data = volumes(6)  # 3 micro-batches per epoch, so the resume lands mid-epoch

    def fresh():
        model = make_tiny_denoiser(seed=1)
        optimizer = adam(model)
        # steps of 3 while checkpoints fall every 2 steps: a schedule not restored on resume would halve too late
        return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)

    model, optimizer, lr_scheduler = fresh()
    straight = train_diffusion(model, ddpm_loss(), data, optimizer, config, lr_scheduler=lr_scheduler,
                               checkpoint_dir=tmp_path / "straight")

    model, optimizer, lr_scheduler = fresh()
    stop_at_step_3 = CallbackReporter(should_stop=lambda: bool(list((tmp_path / "split").glob("step_00000002"))))
    with pytest.raises(CancelledError):
        train_diffusion(model, ddpm_loss(), data, optimizer, config, lr_scheduler=lr_scheduler,
                        checkpoint_dir=tmp_path / "split", reporter=stop_at_step_3)
    model, optimizer, lr_scheduler = fresh()
    resumed = train_diffusion(model, ddpm_loss(), data, optimizer, config, lr_scheduler=lr_scheduler,
                              checkpoint_dir=tmp_path / "split")

    assert resumed.step == straight.step == 6
    assert resumed.last_loss == straight.last_loss
    for name, tensor in straight.ema_model.state_dict().items():
        assert torch.equal(tensor, resumed.ema_model.state_dict()[name]), name
    straight_model = load_trained_weights(make_tiny_denoiser(), tmp_path / "straight", use_ema=False)
    for name, tensor in straight_model.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5**2)


def test_cancel_keeps_last_checkpoint(make_tiny_denoiser, tmp_path):
    model = make_tiny_denoiser()
    steps_done: list[int] = []
    reporter = CallbackReporter(
        on_event=lambda event: steps_done.append(event["step"]) if event["event"] == "progress" else None,
        should_stop=lambda: len(steps_done) >= 5,
    )
    config = TrainConfig(max_steps=20, batch_size=2, ema_decay=0.99, checkpoint_every=2, keep_checkpoints=2)
    with pytest.raises(CancelledError):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model), config, checkpoint_dir=tmp_path, reporter=reporter)

    assert steps_done == [1, 2, 3, 4, 5]
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000004"
    assert json.loads((latest / "info.json").read_text())["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "latest.json", "step_00000002", "step_00000004"]
    restored = load_trained_weights(make_tiny_denoiser(seed=9), tmp_path)  # EMA weights by default
    assert restored(torch.zeros(1, *VOLUME), torch.tensor([3])).shape == (1, *VOLUME)


def test_training_reports_loss_and_eta(make_tiny_denoiser):
    model = make_tiny_denoiser()
    events: list[dict] = []
    config = TrainConfig(max_steps=3, batch_size=2)
    reporter = CallbackReporter(events.append)
    result = train_diffusion(model, ddpm_loss(), volumes(4), adam(model), config, reporter=reporter)
    progress = [event for event in events if event["event"] == "progress"]
    assert [(e["phase"], e["step"], e["total"]) for e in progress] == [("training", s, 3) for s in (1, 2, 3)]
    assert all(e["loss"] > 0 and e["lr"] == 1e-3 for e in progress)
    assert progress[-1]["eta_s"] is not None and progress[-1]["eta_s"] >= 0
    assert result.last_loss == progress[-1]["loss"] and result.ema_model is None and result.checkpoint is None


def test_nan_loss_raises_model_error(make_tiny_denoiser):
    model = make_tiny_denoiser()

    def nan_loss(trained, batch):
        return trained(batch, torch.zeros(2, dtype=torch.long)).sum() * float("nan")

    with pytest.raises(ModelError, match="lower the learning rate"):
        train_diffusion(model, nan_loss, volumes(2), adam(model), TrainConfig(max_steps=2, batch_size=2))


def test_out_of_memory_maps_to_medgen_error_with_advice(make_tiny_denoiser):
    model = make_tiny_denoiser()

    def exhausting_loss(trained, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(OutOfMemoryError, match="smaller patch or batch size") as caught:
        train_diffusion(model, exhausting_loss, volumes(2), adam(model), TrainConfig(max_steps=1, batch_size=2))
    assert caught.value.kind == "oom"


def test_checkpoint_write_survives_leftovers_of_a_killed_writer(tmp_path):
    weights = {"weight": torch.ones(2)}
    save_checkpoint(tmp_path, 2, weights, {"step": 2}, info={})
    # a writer killed mid-write (hidden temp folder) and one killed after its rename but before latest.json
    (tmp_path / ".tmp_step_00000004_999").mkdir()
    (tmp_path / "step_00000004").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000002"

    save_checkpoint(tmp_path, 4, {"weight": torch.full((2,), 4.0)}, {"step": 4}, info={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_00000002", "step_00000004"]
    model_state, ema_state, trainer_state, info = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(model_state["weight"], torch.full((2,), 4.0)) and ema_state is None
    assert trainer_state == {"step": 4} and info == {"step": 4}


def test_a_run_shorter_than_ema_every_ships_its_trained_weights_as_the_ema(make_tiny_denoiser):
    model = make_tiny_denoiser()
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = train_diffusion(model, ddpm_loss(), volumes(4), adam(model),
                             TrainConfig(max_steps=3, batch_size=2, ema_decay=0.99, ema_every=10, amp=False))
    trained, averaged = model.state_dict(), result.ema_model.state_dict()
    assert any(not torch.equal(initial[name], trained[name]) for name in trained)
    assert all(torch.equal(trained[name], averaged[name]) for name in trained)


@pytest.mark.parametrize("clip", [1.0, None])
def test_non_finite_gradients_stop_the_run_before_they_reach_the_weights(make_tiny_denoiser, tmp_path, clip):
    """A NaN gradient under a finite loss (e.g. an overflow in a backward pass) would write NaN into every weight."""
    model = make_tiny_denoiser()

    def loss_with_nan_gradient(network, batch):
        loss = ddpm_loss()(network, batch)
        # the value stays the loss; the backward pass goes through sqrt(-1) of the branch not taken: NaN gradients
        return loss + torch.where(torch.tensor(True), torch.zeros(()), torch.sqrt(-1.0 - 0.0 * loss))

    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ModelError, match="gradients of a training step became nan"):
        train_diffusion(model, loss_with_nan_gradient, volumes(4), adam(model),
                        TrainConfig(max_steps=2, batch_size=2, amp=False, grad_clip_norm=clip), checkpoint_dir=tmp_path)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_a_short_run_trained_longer_averages_like_an_uninterrupted_run(make_tiny_denoiser, tmp_path):
    """The stand-in of a run shorter than ema_every must not enter the average: 3 steps then 12 equals 12 at once."""
    config = TrainConfig(max_steps=12, batch_size=2, ema_decay=0.9, ema_every=5, amp=False)
    uninterrupted = make_tiny_denoiser()
    whole = train_diffusion(uninterrupted, ddpm_loss(), volumes(4), adam(uninterrupted), config,
                            checkpoint_dir=tmp_path / "whole").ema_model.state_dict()
    extended = make_tiny_denoiser()
    optimizer = adam(extended)
    train_diffusion(extended, ddpm_loss(), volumes(4), optimizer, dataclasses.replace(config, max_steps=3),
                    checkpoint_dir=tmp_path / "extended")
    longer = train_diffusion(extended, ddpm_loss(), volumes(4), optimizer, config, checkpoint_dir=tmp_path / "extended")
    assert all(torch.equal(whole[name], longer.ema_model.state_dict()[name]) for name in whole)
    # the checkpoint of the short run gives its trained weights for sampling, as its TrainResult did
    short_dir = tmp_path / "short"
    short = make_tiny_denoiser()
    result = train_diffusion(short, ddpm_loss(), volumes(4), adam(short), dataclasses.replace(config, max_steps=3),
                             checkpoint_dir=short_dir)
    loaded = load_trained_weights(make_tiny_denoiser(), short_dir).state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in result.ema_model.state_dict().items())


def test_a_resumed_run_from_an_earlier_step_drops_the_later_checkpoint_of_a_killed_writer(tmp_path):
    """keep_checkpoints=1 (what the capability trainers use) must never delete the checkpoint just written: a
    writer killed after renaming step 4 into place (latest.json still at 2), then a run resumed from step 2 that
    checkpoints at step 3."""
    save_checkpoint(tmp_path, 2, {"weight": torch.ones(2)}, {"step": 2}, info={}, keep_last=1)
    (tmp_path / "step_00000004").mkdir()  # the killed writer's, never named in latest.json
    save_checkpoint(tmp_path, 3, {"weight": torch.full((2,), 3.0)}, {"step": 3}, info={}, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_00000003"]
    assert latest_checkpoint(tmp_path).name == "step_00000003"
    save_checkpoint(tmp_path, 5, {"weight": torch.full((2,), 5.0)}, {"step": 5}, info={}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step_00000003", "step_00000005"]


@pytest.mark.parametrize("damage, message", [
    (lambda folder: (folder / "step_00000002" / "trainer_state.pt").write_bytes(b""), "cannot be read"),
    (lambda folder: (folder / "latest.json").write_text("[]"), "not a valid checkpoint pointer"),
    (lambda folder: (folder / "latest.json").write_text('{"directory": "../elsewhere/step_00000002"}'),
     "not a valid checkpoint pointer"),
])
def test_damaged_checkpoints_are_model_errors_naming_the_fix(make_tiny_denoiser, tmp_path, damage, message):
    model = make_tiny_denoiser()
    config = TrainConfig(max_steps=2, batch_size=2, checkpoint_every=2, amp=False)
    train_diffusion(model, ddpm_loss(), volumes(4), adam(model), config, checkpoint_dir=tmp_path)
    damage(tmp_path)
    with pytest.raises(ModelError, match=message):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model), TrainConfig(max_steps=4, batch_size=2, amp=False),
                        checkpoint_dir=tmp_path)


def _two_checkpoints(make_tiny_denoiser, folder):
    """A run of 4 steps that keeps its checkpoints of steps 2 and 4 (EMA on)."""
    model = make_tiny_denoiser()
    config = TrainConfig(max_steps=4, batch_size=2, checkpoint_every=2, keep_checkpoints=2, ema_decay=0.9, amp=False)
    train_diffusion(model, ddpm_loss(), volumes(4), adam(model), config, checkpoint_dir=folder)
    return config


@pytest.mark.parametrize("damage, resumed_at", [
    (lambda folder: (folder / "step_00000004" / "model.safetensors").write_bytes(b"cut"), 2),  # the newest is damaged
    (lambda folder: (folder / "latest.json").unlink(), 4),  # killed before naming its checkpoint: each is complete
])
def test_a_run_continues_from_the_newest_checkpoint_that_reads_whole(make_tiny_denoiser, tmp_path, damage, resumed_at):
    config = _two_checkpoints(make_tiny_denoiser, tmp_path)
    damage(tmp_path)
    logs, model = [], make_tiny_denoiser()
    result = train_diffusion(model, ddpm_loss(), volumes(4), adam(model), dataclasses.replace(config, max_steps=6),
                             checkpoint_dir=tmp_path, reporter=CallbackReporter(lambda e: logs.append(e.get("message", ""))))
    assert result.step == 6 and any(f"Resumed from {tmp_path / f'step_{resumed_at:08d}'} at step {resumed_at}" in m for m in logs)
    assert (resumed_at == 4) != any("Continuing from step_00000002, the newest checkpoint that reads whole" in m for m in logs)
    assert not any("start afresh" in m for m in logs)  # advice for a run with nothing to fall back on, not this one


def test_a_run_with_nothing_left_to_train_names_the_checkpoint_it_continued_from(make_tiny_denoiser, tmp_path):
    config = _two_checkpoints(make_tiny_denoiser, tmp_path)
    (tmp_path / "latest.json").unlink()  # killed between renaming step 4 into place and naming it
    model = make_tiny_denoiser()
    result = train_diffusion(model, ddpm_loss(), volumes(4), adam(model), config, checkpoint_dir=tmp_path)
    assert result.checkpoint == tmp_path / "step_00000004" and latest_checkpoint(tmp_path) == result.checkpoint
    # its loss is the one of step 4, recorded in the checkpoint (a fine-tuning history wrote null)
    recorded = json.loads((tmp_path / "step_00000004" / "info.json").read_text())["loss"]
    assert isinstance(recorded, float) and result.last_loss == recorded


def test_a_read_failing_for_another_reason_than_damage_stops_instead_of_passing_over(make_tiny_denoiser, tmp_path,
                                                                                    monkeypatch):
    """A disk error (EIO, too many open files) says nothing about the file: continuing from an older checkpoint
    would silently redo steps, and under DDP only the failing rank would."""
    import errno

    import medgen.diffusion.checkpoint as checkpoint

    config = _two_checkpoints(make_tiny_denoiser, tmp_path)
    real_load = checkpoint.load_file

    def failing_disk(path):
        if "step_00000004" in path:
            raise OSError(errno.EIO, "Input/output error", path)
        return real_load(path)

    monkeypatch.setattr(checkpoint, "load_file", failing_disk)
    model = make_tiny_denoiser()
    with pytest.raises(ModelError, match="Input/output error.*try again once the cause is fixed"):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model), dataclasses.replace(config, max_steps=6),
                        checkpoint_dir=tmp_path)


def test_a_checkpoint_that_lost_its_averaged_weights_is_refused(make_tiny_denoiser, tmp_path):
    config = _two_checkpoints(make_tiny_denoiser, tmp_path)
    for step in (2, 4):
        (tmp_path / f"step_{step:08d}" / "ema.safetensors").unlink()
    model = make_tiny_denoiser()
    with pytest.raises(ModelError, match="EMA updates\) but no ema.safetensors"):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model), dataclasses.replace(config, max_steps=6),
                        checkpoint_dir=tmp_path)


@pytest.mark.parametrize("setting, message", [
    ({"grad_clip_norm": -1.0}, "grad_clip_norm must be a positive number"),  # would train by gradient ascent
    ({"ema_decay": 1.5}, r"ema_decay must lie in \(0, 1\)"),
    ({"grad_accum_steps": 1.5}, "need whole numbers"),
])
def test_training_settings_that_would_misbehave_are_refused(make_tiny_denoiser, setting, message):
    model = make_tiny_denoiser()
    with pytest.raises(BadInputError, match=message):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model), TrainConfig(max_steps=1, amp=False, **setting))


def test_resuming_with_another_optimizer_or_data_schedule_is_refused(make_tiny_denoiser, tmp_path):
    model = make_tiny_denoiser()
    train_diffusion(model, ddpm_loss(), volumes(4), adam(model), TrainConfig(max_steps=2, batch_size=2, amp=False),
                    checkpoint_dir=tmp_path)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with pytest.raises(ModelError, match="another optimizer or for another set of trainable parameters"):
        train_diffusion(model, ddpm_loss(), volumes(4), sgd, TrainConfig(max_steps=4, batch_size=2, amp=False),
                        checkpoint_dir=tmp_path)
    # the data position (epoch, batch) is computed from the step with these: changing them re-uses or skips data
    with pytest.raises(BadInputError, match=r"other settings \(batch_size 2 -> 1, grad_accum_steps 1 -> 2\)"):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model),
                        TrainConfig(max_steps=4, batch_size=1, grad_accum_steps=2, amp=False), checkpoint_dir=tmp_path)


def test_a_torchrun_environment_without_a_process_group_is_refused_with_what_to_call(make_tiny_denoiser, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    model = make_tiny_denoiser()
    with pytest.raises(BadInputError, match=r"call medgen.diffusion.init_distributed\(\) before training"):
        train_diffusion(model, ddpm_loss(), volumes(4), adam(model), TrainConfig(max_steps=1, batch_size=2))


def test_without_shuffling_items_that_never_fill_a_batch_are_reported(make_tiny_denoiser):
    model, logs = make_tiny_denoiser(), []
    reporter = CallbackReporter(on_event=lambda event: logs.append(event) if event["event"] == "log" else None)
    train_diffusion(model, ddpm_loss(), volumes(5), adam(model), TrainConfig(max_steps=1, batch_size=2, shuffle=False,
                                                                             amp=False), reporter=reporter)
    assert [event["level"] for event in logs] == ["warning"] and "1 of 5 item(s) are never trained on" in logs[0]["message"]


def test_a_second_trainer_on_a_checkpoint_folder_in_use_is_refused(make_tiny_denoiser, tmp_path):
    from medgen.io.folder_lock import exclusive_folder

    model = make_tiny_denoiser()
    with exclusive_folder(tmp_path, "checkpoint folder"):  # as another process training into it would
        with pytest.raises(BadInputError, match="checkpoint folder .* in use"):
            train_diffusion(model, ddpm_loss(), volumes(4), adam(model), TrainConfig(max_steps=1, batch_size=2),
                            checkpoint_dir=tmp_path)


def test_resuming_with_a_schedule_the_checkpoint_lacks_says_it_starts_over(make_tiny_denoiser, tmp_path):
    model = make_tiny_denoiser()
    train_diffusion(model, ddpm_loss(), volumes(4), adam(model), TrainConfig(max_steps=2, batch_size=2, amp=False),
                    checkpoint_dir=tmp_path)
    optimizer, logs = adam(model), []
    reporter = CallbackReporter(on_event=lambda event: logs.append(event) if event["event"] == "log" else None)
    train_diffusion(model, ddpm_loss(), volumes(4), optimizer, TrainConfig(max_steps=3, batch_size=2, amp=False),
                    checkpoint_dir=tmp_path, lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, 1), reporter=reporter)
    assert any(event["level"] == "warning" and "holds no learning-rate schedule" in event["message"] for event in logs)


def test_amp_applies_only_on_gpus_with_native_bfloat16(monkeypatch):
    from medgen.diffusion.training import amp_applies

    config = TrainConfig(max_steps=1, amp=True)
    assert not amp_applies(config, torch.device("cpu"))
    for capability, native in (((7, 5), False), ((8, 0), True), ((9, 0), True)):  # T4, A100, H100
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, capability=capability: capability)
        assert amp_applies(config, torch.device("cuda", 0)) is native
        assert not amp_applies(TrainConfig(max_steps=1, amp=False), torch.device("cuda", 0))


def test_a_cpu_run_never_touches_cuda_and_old_per_gpu_rng_states_resume_on_fewer_gpus(make_tiny_denoiser, tmp_path, monkeypatch):
    """A CPU job on a GPU machine must not start CUDA at its checkpoints; a checkpoint of an earlier version holds
    one CUDA state per visible GPU, and a machine with fewer GPUs takes the training device's or none."""
    from medgen.diffusion import training

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was touched by a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", no_cuda)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_cuda)
    model = make_tiny_denoiser()
    # SGD: with CUDA "available", Adam asks the accelerator whether a CUDA graph is being captured, which fails with a
    # CUDA build of torch on a machine without a driver (not what this test is about)
    train_diffusion(model, ddpm_loss(), volumes(4), torch.optim.SGD(model.parameters(), lr=1e-3),
                    TrainConfig(max_steps=2, batch_size=2, checkpoint_every=1), checkpoint_dir=tmp_path)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((int(state[0]), device.index)))
    states = [torch.full((4,), 10, dtype=torch.uint8), torch.full((4,), 11, dtype=torch.uint8)]  # written on two GPUs
    cpu_state = torch.get_rng_state()
    training._restore_rng_state({"cpu": cpu_state, "cuda": states}, torch.device("cuda", 1))
    training._restore_rng_state({"cpu": cpu_state, "cuda": states}, torch.device("cuda", 2))  # this GPU was not there
    training._restore_rng_state({"cpu": cpu_state, "cuda": states[0]}, torch.device("cuda", 0))
    assert restored == [(11, 1), (10, 0)]


def test_gradients_are_clipped_to_the_configured_norm(make_tiny_denoiser):
    """Every optimiser step sees gradients of total norm at most ``grad_clip_norm`` (the loss is scaled so that
    clipping must act)."""
    model = make_tiny_denoiser()
    optimizer = adam(model)
    norms = []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.cat(grads).norm()))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    loss = ddpm_loss()
    train_diffusion(model, lambda trained, batch: 1e4 * loss(trained, batch), volumes(4), optimizer,
                    TrainConfig(max_steps=3, batch_size=2, amp=False, grad_clip_norm=1.0))
    assert len(norms) == 3 and all(norm <= 1.0 + 1e-5 for norm in norms) and max(norms) > 0.99


def test_the_reported_loss_is_the_mean_over_accumulated_micro_batches(make_tiny_denoiser):
    """With gradient accumulation the step's loss is the micro-batches' mean, not their sum."""
    model = make_tiny_denoiser()

    def constant_loss(trained, batch):
        return 0.0 * sum(p.sum() for p in trained.parameters()) + 3.0

    result = train_diffusion(model, constant_loss, volumes(4), adam(model),
                             TrainConfig(max_steps=2, batch_size=1, grad_accum_steps=2, amp=False))
    assert result.last_loss == pytest.approx(3.0)


def test_the_loss_is_averaged_over_ranks(monkeypatch):
    """Under DDP the reported loss is the mean over the processes (a sum would scale it by their number)."""
    from medgen.diffusion.distributed import DistContext
    from medgen.diffusion.training import _mean_over_ranks

    other_rank_loss = 5.0
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda tensor, *args, **kwargs: tensor.add_(other_rank_loss))
    assert _mean_over_ranks(1.0, DistContext(rank=0, world_size=2), torch.device("cpu")) == pytest.approx(3.0)
    assert _mean_over_ranks(1.0, DistContext(), torch.device("cpu")) == 1.0


def test_a_batch_larger_than_the_data_is_capped_and_said():
    from medgen.diffusion import capped_batch_size

    events = []
    reporter = CallbackReporter(events.append)
    assert capped_batch_size(4, 4, reporter) == 4 and events == []
    assert capped_batch_size(8, 3, reporter, "training cases") == 3
    assert events == [{"event": "log", "level": "info", "message": "Batch size 8 is more than the 3 training cases: using 3."}]
