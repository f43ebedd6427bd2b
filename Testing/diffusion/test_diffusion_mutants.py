"""Engine behaviour that no other test pinned down (found by mutation testing).
(it uses that folder's conftest fixtures ``make_tiny_denoiser``, ``tiny_unet``, ``tiny_controlnet_from``)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDPMScheduler

from medgen.diffusion import TrainConfig, controlnet_denoiser, noise_prediction_loss, train_diffusion, unet_denoiser
from medgen.errors import BadInputError


def _x0(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _oracle(scheduler: DDPMScheduler, x0: torch.Tensor):
    """A perfect model for the data point x0, answering in the scheduler's prediction type (DDPM definitions:
    x_t = √ᾱ x0 + √(1-ᾱ) ε, v = √ᾱ ε - √(1-ᾱ) x0)."""

    def denoise(x_t, t):
        alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        eps = (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0}[
            scheduler.prediction_type]

    return denoise


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_the_loss_target_follows_the_prediction_type(prediction_type):
    """A perfect model of each prediction type scores zero; answering in another type does not."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    x0 = _x0()
    generator = torch.Generator().manual_seed(1)
    assert float(noise_prediction_loss(_oracle(scheduler, x0), scheduler, x0, generator=generator)) < 1e-8
    for other in {"epsilon", "sample", "v_prediction"} - {prediction_type}:
        wrong = DDPMScheduler(num_train_timesteps=100, prediction_type=other)
        assert float(noise_prediction_loss(_oracle(wrong, x0), scheduler, x0, generator=generator)) > 1e-2


def test_training_timesteps_cover_the_whole_schedule():
    """t is uniform over 0..T-1: the last timestep (where sampling starts, from pure noise) and t = 0 are trained."""
    scheduler = DDPMScheduler(num_train_timesteps=5)
    seen = []

    def recording(x_t, t):
        seen.extend(t.tolist())
        return torch.zeros_like(x_t)

    noise_prediction_loss(recording, scheduler, torch.zeros(400, 1, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    assert set(seen) == {0, 1, 2, 3, 4}


def test_a_generator_makes_the_loss_reproducible_without_touching_the_global_rng():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    x0, model = _x0(), lambda x_t, t: 0.5 * x_t  # noqa: E731
    global_state = torch.get_rng_state()
    first = noise_prediction_loss(model, scheduler, x0, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)  # another global state: must not matter
    again = noise_prediction_loss(model, scheduler, x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    torch.manual_seed(0)
    torch.set_rng_state(global_state)
    noise_prediction_loss(model, scheduler, x0, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), global_state)


def _loss(model, batch):
    return torch.nn.functional.mse_loss(model(batch, torch.zeros(batch.shape[0], dtype=torch.long)), 0.5 * batch)


def test_resuming_with_another_seed_is_refused(make_tiny_denoiser, tmp_path):
    """The data order and each process's random state follow from the seed: a resume with another one would
    silently re-use or skip data, so it is refused like a batch-size change."""
    data = list(_x0(4))
    model = make_tiny_denoiser()
    train_diffusion(model, _loss, data, torch.optim.Adam(model.parameters()),
                    TrainConfig(max_steps=2, batch_size=2, amp=False, seed=0), checkpoint_dir=tmp_path)
    with pytest.raises(BadInputError, match=r"other settings \(seed 0 -> 5\)"):
        train_diffusion(model, _loss, data, torch.optim.Adam(model.parameters()),
                        TrainConfig(max_steps=4, batch_size=2, amp=False, seed=5), checkpoint_dir=tmp_path)


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_an_ema_decay_at_either_end_is_refused(make_tiny_denoiser, decay):
    """ema_decay must lie in the open interval (0, 1): 1 would freeze the average at the first update's weights."""
    model = make_tiny_denoiser()
    with pytest.raises(BadInputError, match=r"ema_decay must lie in \(0, 1\)"):
        train_diffusion(model, _loss, list(_x0(4)), torch.optim.Adam(model.parameters()),
                        TrainConfig(max_steps=1, batch_size=2, amp=False, ema_decay=decay))


@pytest.mark.parametrize("train_mode", [True, False])
def test_train_mode_decides_the_mode_the_loss_sees(make_tiny_denoiser, train_mode):
    """train_mode=False keeps frozen BatchNorm statistics and dropout as pretrained (parameter-efficient fine-tuning)."""
    model, modes = make_tiny_denoiser(), []

    def recording(trained, batch):
        modes.append(trained.training)
        return _loss(trained, batch)

    model.train(not train_mode)  # start in the other mode
    train_diffusion(model, recording, list(_x0(4)), torch.optim.Adam(model.parameters()),
                    TrainConfig(max_steps=2, batch_size=2, amp=False, train_mode=train_mode))
    assert modes == [train_mode, train_mode]


def test_the_controlnet_conditioning_scale_weighs_its_residuals(tiny_unet, tiny_controlnet_from):
    """0 = the UNet alone, 1 = as trained; the scale reaches the ControlNet while sampling and while training."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a ControlNet that is not a no-op, and a UNet whose zero-initialised output layer is not
        for parameter in [*tiny_controlnet_from.parameters(), *tiny_unet.parameters()]:
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    x_t, t = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([500, 500])
    mask = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(3))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            plain = unet_denoiser(tiny_unet)(x_t, t).detach()
            off = controlnet_denoiser(tiny_unet, tiny_controlnet_from, mask, conditioning_scale=0.0)(x_t, t).detach()
            full = controlnet_denoiser(tiny_unet, tiny_controlnet_from, mask, conditioning_scale=1.0)(x_t, t).detach()
        assert torch.allclose(off, plain, atol=1e-6)
        assert (full - plain).abs().max() > 1e-3


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for code planted in a shared run folder."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_whose_trainer_state_runs_code_is_refused_without_running_it(tmp_path):
    """trainer_state.pt is read with torch's weights-only unpickler: a planted pickle that calls functions is a
    damaged checkpoint, and its code never runs."""
    from medgen.diffusion.checkpoint import DamagedCheckpointError, load_checkpoint, load_newest_readable, save_checkpoint

    folder = save_checkpoint(tmp_path / "run", 2, {"weight": torch.ones(2)}, {"step": 2}, info={})
    marker = tmp_path / "code_ran"
    torch.save({"step": 2, "payload": _RunsCodeWhenUnpickled(marker)}, folder / "trainer_state.pt")
    with pytest.raises(DamagedCheckpointError, match="cannot be read") as refused:
        load_checkpoint(folder)
    # torch's own text would advise loading it with weights_only=False, which would run the code
    assert "objects other than tensors" in str(refused.value) and "weights_only" not in str(refused.value)
    with pytest.raises(DamagedCheckpointError):
        load_newest_readable(tmp_path / "run", warn=lambda message: None)
    assert not marker.exists()
