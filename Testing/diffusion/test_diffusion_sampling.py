"""Engine oracles for the reverse loop: spec C.8 QC4 / C.9 oracle 8 (DDIM timesteps and x0), DDPM
posterior consistency, determinism, timestep checks, SDEdit, fp32 arithmetic, progress/cancel, adapters."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

from medgen.diffusion import (
    SIGMOID_SCHEDULE,
    batched_cfg_denoiser,
    cfg_denoiser,
    controlnet_denoiser,
    sample,
    sdedit,
    strided_timesteps,
    unet_denoiser,
)
from medgen.errors import BadInputError, CancelledError, OutOfMemoryError
from medgen.progress import CallbackReporter

DIFF3_TIMESTEPS = list(range(999, 8, -10))


def diff3_ddim() -> DDIMScheduler:
    """DIFF-3's sampler per spec QC4: sigmoid schedule, offset 9, alpha-bar(prev) = 1 at the end, x0 clipped."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE, steps_offset=9, set_alpha_to_one=True, clip_sample=True
    )
    scheduler.set_timesteps(100)
    return scheduler


def oracle_denoiser(scheduler, x0: torch.Tensor, seen: list[int] | None = None):
    """Predicts the exact noise that turns x0 into x_t, i.e. a perfect epsilon model for the data point x0."""

    def denoise(x_t, t):
        if seen is not None:
            seen.append(int(t[0]))
        alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    return denoise


def test_ddim_timesteps_999_to_9():
    scheduler = diff3_ddim()
    assert scheduler.timesteps.tolist() == DIFF3_TIMESTEPS
    assert strided_timesteps(1000, 100, offset=9) == DIFF3_TIMESTEPS

    seen: list[torch.Tensor] = []

    def recording_denoise(x_t, t):
        seen.append(t.clone())
        return torch.zeros_like(x_t)

    sample(recording_denoise, scheduler, torch.randn(2, 1, 4, 4, 4))
    assert [int(t[0]) for t in seen] == DIFF3_TIMESTEPS
    assert all(t.dtype == torch.long and t.tolist() == [t[0].item()] * 2 for t in seen)


def test_ddim_oracle_returns_latent_and_final_x0():
    scheduler = diff3_ddim()
    latent = torch.rand(2, 4, 5, 5, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    result = sample(oracle_denoiser(scheduler, latent), scheduler, noise)
    assert (result - latent).abs().max().item() < 1e-4

    # With any model, the output is exactly the (clipped) x0 estimate at t = 9.
    x0_at_last_step = {}

    def keep_x0(x_prev, x0_pred, t):
        x0_at_last_step[t] = x0_pred
        return x_prev

    result = sample(lambda x, t: 0.3 * x + 0.1, scheduler, noise, post_step=keep_x0)
    assert torch.equal(result, x0_at_last_step[9])
    assert result.abs().max().item() <= 1.0


def test_ddpm_ancestral_chain_matches_q_marginal():
    # Posterior consistency: with an exact epsilon model for x0, ancestral steps sample q(x_{t-1} | x_t, x0),
    # so the chain started from q(x_T | x0) stays on the marginals q(x_t | x0) = N(sqrt(abar_t) x0, 1 - abar_t).
    scheduler = DDPMScheduler(num_train_timesteps=1000, schedule="linear_beta", clip_sample=False)
    x0 = torch.full((4, 1, 16, 16, 16), 0.5)
    generator = torch.Generator().manual_seed(0)
    start, stop = 999, 500
    t_start = torch.full((4,), start, dtype=torch.long)
    x_start = scheduler.add_noise(x0, torch.randn(x0.shape, generator=generator), t_start)
    x_stop = sample(
        oracle_denoiser(scheduler, x0), scheduler, x_start, timesteps=range(start, stop, -1), generator=generator
    )
    # after the step at t = stop + 1 the chain holds x_stop
    alpha_bar = scheduler.alphas_cumprod[stop].item()
    samples = x_stop.flatten()
    standard_error = (1 / samples.numel()) ** 0.5
    assert abs(samples.mean().item() - alpha_bar**0.5 * 0.5) < 5 * standard_error
    assert abs(samples.var().item() - (1 - alpha_bar)) < 5 * standard_error * 2**0.5


def test_the_last_ddpm_step_returns_the_x0_estimate_exactly():
    """At t = 0 DDPM's mean is β0 / (1 - ᾱ0) · x̂0 = x̂0; MONAI's float32 tables give 0.99983 · x̂0 (a bias of
    1.7e-4 on bright images, above spec A.9 #11's 1e-4 RMS)."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    x0 = torch.ones(1, 1, 4, 4, 4)
    x_t = scheduler.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0]))
    result = sample(oracle_denoiser(scheduler, x0), scheduler, x_t, timesteps=[0])
    assert (result - x0).abs().max() < 1e-6


def test_sampling_is_deterministic_given_seed(make_tiny_denoiser):
    denoiser = make_tiny_denoiser()
    scheduler = DDIMScheduler(num_train_timesteps=1000, schedule=SIGMOID_SCHEDULE, clip_sample=False)
    timesteps = strided_timesteps(1000, 5)

    def run(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((2, 1, 8, 8, 8), generator=generator)
        return sample(unet_denoiser(denoiser), scheduler, noise, timesteps=timesteps, eta=1.0, generator=generator)

    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_explicit_timesteps_must_match_monai_step_rule():
    noise = torch.randn(1, 1, 2, 2, 2)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(BadInputError, match="consecutive"):
        sample(zero, ddpm, noise, timesteps=[999, 989, 979])
    ddim = DDIMScheduler(num_train_timesteps=1000)
    with pytest.raises(BadInputError, match="stride"):
        sample(zero, ddim, noise, timesteps=[999, 979, 958])
    with pytest.raises(BadInputError, match=r"\[0, 999\]"):
        sample(zero, ddim, noise, timesteps=[1000, 990])
    # MONAI's own set_timesteps(10) strides 111 while its step goes back 1000 // 10 = 100
    ddim.set_timesteps(10)
    with pytest.raises(BadInputError, match="stride"):
        sample(zero, ddim, noise)
    # MRGen's "leading" spacing 981, 961, ..., 1: MONAI then steps t -> t - 20
    mrgen = strided_timesteps(1000, 50, offset=1)
    assert mrgen[:2] == [981, 961] and mrgen[-1] == 1
    sample(zero, ddim, noise, timesteps=mrgen)
    assert ddim.num_inference_steps == 50 and ddim.timesteps.tolist() == mrgen


def test_sdedit_starts_at_given_timestep():
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, steps_offset=19)
    scheduler.set_timesteps(50)  # 999, 979, ..., 19
    x0 = torch.rand(1, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    seen: list[int] = []
    first_inputs: list[torch.Tensor] = []
    oracle = oracle_denoiser(scheduler, x0, seen)
    generator = torch.Generator().manual_seed(1)
    edited = sdedit(lambda x_t, t: first_inputs.append(x_t.clone()) or oracle(x_t, t), scheduler, x0, 499, generator=generator)
    assert seen == [t for t in scheduler.timesteps.tolist() if t <= 499] and seen[0] == 499
    # the first step sees x0 noised to exactly that level, with the generator's first draw
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first_inputs[0], scheduler.add_noise(x0, eps, torch.tensor([499])))
    assert (edited - x0).abs().max().item() < 1e-4
    assert len(scheduler.timesteps) == 50 and scheduler.timesteps[0] == 999  # the caller's schedule is left whole
    seen.clear()
    sdedit(oracle_denoiser(scheduler, x0, seen), scheduler, x0, 699, generator=generator)
    assert seen[0] == 699 and seen[-1] == 19
    with pytest.raises(BadInputError, match="nearest is 499"):
        sdedit(oracle_denoiser(scheduler, x0), scheduler, x0, 500)
    # an explicit list overrides the scheduler's own (here MONAI's DDPM default 999, 998, ..., 0)
    ddpm = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    seen.clear()
    sdedit(oracle_denoiser(ddpm, x0, seen), ddpm, x0, 5, timesteps=range(9, -1, -1))
    assert seen == [5, 4, 3, 2, 1, 0]


def test_scheduler_arithmetic_stays_fp32_with_bf16_model():
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    # MONAI's add_noise casts the schedule to its input dtype; the loop must undo that
    scheduler.add_noise(torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.bfloat16), torch.tensor([5]))
    assert scheduler.alphas_cumprod.dtype == torch.bfloat16
    received = []

    def bf16_denoise(x_t, t):
        received.append(x_t.dtype)
        return (0.1 * x_t).to(torch.bfloat16)

    noise = torch.randn(1, 1, 4, 4, 4)
    result = sample(bf16_denoise, scheduler, noise, timesteps=[3, 2, 1, 0], model_dtype=torch.bfloat16)
    assert set(received) == {torch.bfloat16}
    assert result.dtype == torch.float32 and scheduler.alphas_cumprod.dtype == torch.float32
    # the table is rebuilt, not cast back: bf16 rounds ᾱ_2 to 1 and the DDPM step would divide 0 by 0 (NaN)
    assert torch.equal(scheduler.alphas_cumprod, DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)
    assert torch.isfinite(result).all()


def test_sampling_reports_progress_and_cancels_between_steps():
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    events: list[dict] = []
    calls: list[int] = []

    def counting_denoise(x_t, t):
        calls.append(int(t[0]))
        return torch.zeros_like(x_t)

    reporter = CallbackReporter(on_event=events.append, should_stop=lambda: len(calls) >= 4)
    with pytest.raises(CancelledError):
        sample(counting_denoise, scheduler, torch.randn(1, 1, 2, 2, 2), timesteps=strided_timesteps(1000, 10),
               reporter=reporter, phase="ddim")
    assert calls == [900, 800, 700, 600]
    assert [(e["phase"], e["step"], e["total"]) for e in events] == [("ddim", i, 10) for i in range(1, 5)]


def test_a_single_explicit_ddim_timestep_is_the_last_step_and_lands_on_x0():
    """One DDIM step, or SDEdit from the last strided timestep: a fresh MONAI scheduler strides 1, so without
    care the step would go t -> t-1 and return a still noisy sample."""
    x0 = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    for start in (999, 500, 9):
        scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
        assert (sample(oracle_denoiser(scheduler, x0), scheduler, noise, timesteps=[start]) - x0).abs().max() < 1e-4
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=True)
    seen: list[int] = []
    edited = sdedit(oracle_denoiser(scheduler, x0, seen), scheduler, x0, 9, timesteps=strided_timesteps(1000, 100, 9),
                    generator=torch.Generator().manual_seed(2))
    assert seen == [9] and (edited - x0).abs().max() < 1e-4
    scheduler.set_timesteps(50)  # 980, 960, ..., 0: the caller's own schedule survives an SDEdit from its last step
    sdedit(oracle_denoiser(scheduler, x0), scheduler, x0, 0)
    assert scheduler.num_inference_steps == 50 and len(scheduler.timesteps) == 50


def test_sampling_out_of_memory_maps_to_medgen_error():
    def exhausting_denoise(x_t, t):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    with pytest.raises(OutOfMemoryError, match="fewer volumes per batch") as caught:
        sample(exhausting_denoise, DDPMScheduler(num_train_timesteps=10), torch.randn(2, 1, 4, 4, 4))
    assert caught.value.kind == "oom"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_model_predicting_non_finite_values_is_a_model_error_not_a_nan_result(bad):
    """A model folder with damaged weights must not give NaN volumes that are written as results (and later blamed
    on the user's images by the nnU-Net export)."""
    from medgen.errors import ModelError

    def damaged_denoise(x_t, t):
        return torch.full_like(x_t, bad)

    with pytest.raises(ModelError, match="predicted NaN or infinite values at timestep 9: its weights are damaged"):
        sample(damaged_denoise, DDPMScheduler(num_train_timesteps=10), torch.randn(1, 1, 4, 4, 4))


@pytest.mark.parametrize("failure, expected", [
    # PyTorch's CPU allocator raises a plain RuntimeError
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"), "fewer volumes"),
    (MemoryError(), "fewer volumes"),
    (OutOfMemoryError("LMI map ran out of memory; lower memory_budget_mb"), "memory_budget_mb"),  # kept: it says more
    (RuntimeError("shapes do not match"), "shapes do not match"),  # not memory: passes unchanged
])
def test_sampling_names_host_memory_failures_and_leaves_other_errors_alone(failure, expected):
    def failing_denoise(x_t, t):
        raise failure

    with pytest.raises((OutOfMemoryError, RuntimeError), match=expected) as caught:
        sample(failing_denoise, DDPMScheduler(num_train_timesteps=10), torch.randn(1, 1, 4, 4, 4))
    assert isinstance(caught.value, OutOfMemoryError) == (expected != "shapes do not match")


def test_controlnet_at_init_matches_plain_unet(tiny_unet, tiny_controlnet_from):
    # Spec B.9/D: zero convolutions make a freshly initialised ControlNet a no-op on the UNet.
    x_t, t = torch.randn(2, 1, 8, 8, 8), torch.tensor([10, 500])
    mask = torch.rand(2, 1, 8, 8, 8)
    with torch.no_grad():
        plain = unet_denoiser(tiny_unet)(x_t, t)
        controlled = controlnet_denoiser(tiny_unet, tiny_controlnet_from, mask)(x_t, t)
    assert plain.abs().max() > 0.01  # not the all-zero output of an untrained UNet
    assert torch.equal(plain, controlled)


def test_sampling_embeds_the_control_once_and_training_every_call(tiny_unet, tiny_controlnet_from):
    """The control's embedding is reused across sampling steps (same result) but recomputed under gradients."""
    with torch.no_grad():  # a ControlNet that is not a no-op, so the residuals depend on the control
        for parameter in tiny_controlnet_from.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    calls = []
    tiny_controlnet_from.controlnet_cond_embedding.register_forward_hook(lambda *args: calls.append(1))
    x_t, mask = torch.randn(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    denoise = controlnet_denoiser(tiny_unet, tiny_controlnet_from, mask)
    with torch.no_grad():
        steps = [denoise(x_t, torch.tensor([t, t])) for t in (900, 500, 10)]
    assert len(calls) == 1
    assert type(tiny_controlnet_from.controlnet_cond_embedding).__name__ == "ControlNetConditioningEmbedding"  # restored
    fresh = [controlnet_denoiser(tiny_unet, tiny_controlnet_from, mask)(x_t, torch.tensor([t, t])).detach() for t in (900, 500, 10)]
    assert all(torch.equal(cached, again) for cached, again in zip(steps, fresh))
    assert not torch.allclose(steps[0], unet_denoiser(tiny_unet)(x_t, torch.tensor([900, 900])).detach(), atol=1e-4)
    assert len(calls) == 4  # with gradients: every call embeds the control

    class Wrapped(torch.nn.Module):  # like DistributedDataParallel under torchrun: the ControlNet is its .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            return self.module(**inputs)

    wrapped = controlnet_denoiser(tiny_unet, Wrapped(tiny_controlnet_from), mask)
    assert torch.equal(wrapped(x_t, torch.tensor([900, 900])).detach(), fresh[0])  # training through the wrapper
    with torch.no_grad():
        assert torch.equal(wrapped(x_t, torch.tensor([500, 500])), steps[1]) and len(calls) == 6
        assert torch.equal(wrapped(x_t, torch.tensor([10, 10])), steps[2]) and len(calls) == 6  # cached


def test_cfg_combines_conditional_and_unconditional():
    conditional = lambda x, t: x + 1.0  # noqa: E731
    unconditional = lambda x, t: x  # noqa: E731
    x = torch.zeros(1, 1, 2, 2, 2)
    t = torch.tensor([0])
    assert torch.equal(cfg_denoiser(conditional, unconditional, 1.0)(x, t), conditional(x, t))
    assert torch.equal(cfg_denoiser(conditional, unconditional, 3.0)(x, t), torch.full_like(x, 3.0))


def test_batched_cfg_equals_sequential_cfg():
    x, t = torch.randn(2, 1, 4, 4, 4), torch.tensor([5, 5])
    conditional = lambda x_t, t_: 2.0 * x_t + 1.0  # noqa: E731
    unconditional = lambda x_t, t_: x_t - 1.0  # noqa: E731

    def both(x_t, t_):  # first half unconditional, second half conditional
        half = x_t.shape[0] // 2
        return torch.cat([unconditional(x_t[:half], t_[:half]), conditional(x_t[half:], t_[half:])])

    for scale in (0.0, 1.0, 7.0):
        assert torch.allclose(batched_cfg_denoiser(both, scale)(x, t), cfg_denoiser(conditional, unconditional, scale)(x, t))


def test_unet_denoiser_passes_the_context_and_the_concatenated_condition():
    """``unet_denoiser`` calls the network with x_t and the condition stacked on channels, the timesteps and the
    cross-attention context it was given."""
    seen = {}

    def network(network_input, timesteps, context):
        seen.update(network_input=network_input, timesteps=timesteps, context=context)
        return network_input[:, :1]

    x_t, condition, context = torch.rand(2, 1, 4, 4, 4), torch.rand(2, 3, 4, 4, 4), torch.rand(2, 5, 8)
    t = torch.tensor([7, 7])
    unet_denoiser(network, context=context, concat=condition)(x_t, t)
    assert torch.equal(seen["network_input"], torch.cat([x_t, condition], dim=1))
    assert seen["timesteps"] is t and seen["context"] is context
