"""Mask-conditioned (MRGen-style) synthesis on tiny data: spec B.10 oracles 4-6, MRGen's timesteps, resumable
stages, generation on the mask's grid, filtering, report and cancellation."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from safetensors.torch import load_file

from medgen.diffusion import controlnet_denoiser, cfg_denoiser, sample
from medgen.errors import BadInputError, CancelledError, ModelError
from medgen.io import load_volume
from medgen.metrics import psnr
from medgen.progress import CallbackReporter
from medgen.synthesis.checker import load_checker
from medgen.synthesis.filtering import FilterThresholds
from medgen.synthesis.maskgen import MaskGenModel, generate_candidates, generate_on_model_grid, synthesize_from_masks
from medgen.synthesis.maskgen_training import _LatentData, flip_combinations, flip_spatial, pseudo_labelled_targets, train_maskgen
from medgen.synthesis.maskgen_networks import (
    MaskGenConfig,
    build_controlnet,
    build_image_vae,
    build_latent_unet,
    sampling_scheduler,
)
from medgen.synthesis.masks import control_tensor
from medgen.synthesis.prompts import Prompt, TrainingSample, compose_training_set
from medgen_testing import oblique_affine, stored_reversed

SIZE = 16
FAST = dict(vae_steps=4, unet_steps=4, controlnet_steps=4, checker_steps=4, checkpoint_every=2)
SOURCE, TARGET = Prompt("T1 MRI", region="abdomen"), Prompt("T2 MRI", region="abdomen")
LUT_A, LUT_B = (0.1, 0.8, 0.5), (0.6, 0.2, 0.95)  # background, organ 1, organ 2 (spec B.10 item 10)
ACCEPT_ALL = FilterThresholds(avg_confidence=0.0, avg_iou=0.0, organ_iou=0.0, organ_confidence=0.0)
QUICK = dict(candidates=2, chunk=2, steps=2)


def phantom(seed: int, lut, affine=None):
    """A 16³ LUT phantom: a large 'liver' sphere (1) and a small 'kidney' sphere (2) at a random offset."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    shift = ((torch.rand(3, generator=generator) - 0.5) * 0.3).view(3, 1, 1, 1)
    label = torch.zeros(SIZE, SIZE, SIZE, dtype=torch.int64)
    label[(grid - shift - torch.tensor([-0.3, 0.0, 0.0]).view(3, 1, 1, 1)).pow(2).sum(0) < 0.2] = 1
    label[(grid - shift - torch.tensor([0.45, 0.0, 0.0]).view(3, 1, 1, 1)).pow(2).sum(0) < 0.08] = 2
    image = torch.tensor(lut)[label] + 0.03 * torch.randn((SIZE,) * 3, generator=generator)
    affine = torch.eye(4, dtype=torch.float64) if affine is None else torch.as_tensor(affine)
    return MetaTensor(image.clamp(0, 1)[None], affine=affine), MetaTensor(label[None], affine=affine)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    sources = [phantom(seed, LUT_A) for seed in range(3)]
    targets = [phantom(10 + seed, LUT_B)[0] for seed in range(3)]
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("maskgen")
    train_maskgen(sources, targets, ["liver", "kidney"], folder, MaskGenConfig.tiny(**FAST), source_prompt=SOURCE, target_prompt=TARGET)
    return folder


@pytest.fixture(scope="module")
def model(model_dir):
    return MaskGenModel.load(model_dir)


def test_training_writes_a_complete_model_folder(model_dir):
    document = json.loads((model_dir / "medgen_model.json").read_text())
    assert document["task"] == "mask-conditioned-ldm"
    assert [organ["name"] for organ in document["organs"]] == ["liver", "kidney"]
    assert document["prompts"]["T2 MRI"]["organs"] == ["liver", "kidney"]  # target prompts name the organs (B.4)
    assert document["prompt_encoder"]["vocabulary"]["modalities"] == ["T1 MRI", "T2 MRI"]
    assert document["grid_shape"] == [SIZE] * 3 and document["latent_shape"] == [4, 4, 4, 4]
    for name in ("vae", "unet", "prompt_encoder", "controlnet"):
        assert (model_dir / f"{name}.safetensors").is_file()
    assert (model_dir / "checker" / "medgen_model.json").is_file()


def test_scale_factor_normalises_the_latents(model_dir):
    from safetensors.torch import load_file

    latents = load_file(str(model_dir / "latents.safetensors"))
    scale = json.loads((model_dir / "medgen_model.json").read_text())["scale_factor"]
    assert scale != pytest.approx(0.18215)
    z = latents["mu"] + latents["sigma"] * torch.randn(latents["mu"].shape, generator=torch.Generator().manual_seed(7))
    assert float((z * scale).std()) == pytest.approx(1.0, abs=0.15)


def test_the_vae_reconstruction_psnr_is_recorded(model_dir, model):
    images = [phantom(seed, LUT_A)[0].as_tensor() for seed in range(3)] + [phantom(10 + seed, LUT_B)[0].as_tensor() for seed in range(3)]
    with torch.no_grad():
        per_image = [psnr(model.vae.reconstruct(image[None])[0], image) for image in images]
    recorded = json.loads((model_dir / "medgen_model.json").read_text())["vae_reconstruction_psnr_db"]
    assert recorded == pytest.approx(sum(per_image) / len(per_image), rel=1e-4)
    assert 0 < recorded < 60


def test_training_again_skips_finished_stages(model_dir):
    events = []
    train_maskgen([phantom(s, LUT_A) for s in range(3)], [phantom(10 + s, LUT_B)[0] for s in range(3)], ["liver", "kidney"], model_dir,
                  MaskGenConfig.tiny(**FAST), source_prompt=SOURCE, target_prompt=TARGET, reporter=CallbackReporter(events.append))
    assert not [e for e in events if e["event"] == "progress"]
    resumed = [e["message"] for e in events if e["event"] == "log" and e["message"].startswith("Resumed")]
    assert len(resumed) == 3 and all("at step 4 of 4" in message for message in resumed)


def test_target_pseudo_labels_come_from_the_checker(model_dir):
    checker = load_checker(model_dir / "checker")
    named = {"organs": ("liver", "kidney")}
    samples = compose_training_set([phantom(s, LUT_A) for s in range(2)], [phantom(10 + s, LUT_B)[0] for s in range(2)],
                                   Prompt(**vars(SOURCE) | named), Prompt(**vars(TARGET) | named))
    labelled = pseudo_labelled_targets(samples, checker, "cpu")
    assert [sample.is_source for sample in labelled] == [True, True, False, False]
    assert all(new.label is old.label for new, old in zip(labelled[:2], samples[:2]))  # source masks untouched
    for new, old in zip(labelled[2:], samples[2:]):
        assert old.label is None and new.image is old.image
        with torch.no_grad():
            expected = checker(torch.as_tensor(old.image)[None].float())[0].argmax(0, keepdim=True)
        assert new.label.shape == (1, SIZE, SIZE, SIZE) and torch.equal(new.label, expected)
        assert torch.equal(new.control(), control_tensor(expected, 2, "one-hot"))


def test_training_with_target_pseudo_labels_trains_the_checker_first(tmp_path):
    with pytest.raises(BadInputError, match="checker"):
        MaskGenConfig.tiny(target_pseudo_labels=True, train_checker=False)
    events = []
    torch.manual_seed(0)
    train_maskgen([phantom(s, LUT_A) for s in range(2)], [phantom(10 + s, LUT_B)[0] for s in range(2)], ["liver", "kidney"], tmp_path,
                  MaskGenConfig.tiny(**FAST, target_pseudo_labels=True), source_prompt=SOURCE, target_prompt=TARGET,
                  reporter=CallbackReporter(events.append))
    phases = [e["phase"] for e in events if e["event"] == "progress"]
    assert phases.index("controlnet") > max(i for i, phase in enumerate(phases) if phase == "checker")
    assert MaskGenModel.load(tmp_path).config.target_pseudo_labels


def test_the_training_seed_is_recorded_and_reproducible(model_dir, tmp_path):
    weights = {}
    for seed in (0, 1):
        torch.manual_seed(0)  # the networks' initialisation: the caller's RNG, as in model_dir
        folder = tmp_path / f"seed{seed}"
        train_maskgen([phantom(s, LUT_A) for s in range(3)], [phantom(10 + s, LUT_B)[0] for s in range(3)], ["liver", "kidney"],
                      folder, MaskGenConfig.tiny(**FAST, seed=seed), source_prompt=SOURCE, target_prompt=TARGET)
        assert MaskGenModel.load(folder).config.seed == seed
        weights[seed] = load_file(folder / "controlnet.safetensors")
    reference = load_file(model_dir / "controlnet.safetensors")
    assert all(torch.equal(weights[0][name], reference[name]) for name in reference)
    assert not all(torch.equal(weights[1][name], reference[name]) for name in reference)


def test_a_controlnet_stage_started_again_gives_the_same_controlnet(model_dir, tmp_path):
    """A run resumed before the ControlNet's first checkpoint skips the finished checker stage (which draws from the
    global generator): the ControlNet's initial weights must still be the uninterrupted run's."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    shutil.rmtree(folder / "controlnet")
    for name in ("controlnet.safetensors", "medgen_model.json"):
        (folder / name).unlink()
    torch.manual_seed(123)  # another global generator state than the fixture's
    train_maskgen([phantom(seed, LUT_A) for seed in range(3)], [phantom(10 + seed, LUT_B)[0] for seed in range(3)],
                  ["liver", "kidney"], folder, MaskGenConfig.tiny(**FAST), source_prompt=SOURCE, target_prompt=TARGET)
    again, first = load_file(folder / "controlnet.safetensors"), load_file(model_dir / "controlnet.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[name], first[name]) for name in first)


def test_flip_combinations_and_flips():
    assert flip_combinations((2, 0)) == [(), (0,), (2,), (0, 2)]
    assert len(flip_combinations((0, 1, 2))) == 8
    volume = torch.arange(24.0).reshape(1, 2, 3, 4)
    assert torch.equal(flip_spatial(volume, ()), volume)
    assert torch.equal(flip_spatial(volume, (0, 2)), volume.flip(1).flip(3))
    for name in ("controlnet_flip_axes", "unet_flip_axes"):
        for axes in ((3,), (0, 0)):
            with pytest.raises(BadInputError, match=name):
                MaskGenConfig.tiny(**{name: axes})


def test_random_flips_draw_only_the_stage_axes_and_nothing_without_them():
    mu = torch.zeros(2, 1, 2, 2, 2)
    data = _LatentData([None, None], mu, mu, 1.0, None, 0.0, {flip: (mu, mu) for flip in flip_combinations((0, 1, 2))[1:]})
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert data.random_flips(3, ()) == [(), (), ()] and torch.equal(torch.get_rng_state(), state)
    drawn = {flip for _ in range(20) for flip in data.random_flips(4, (0, 2))}
    assert drawn == {(), (0,), (2,), (0, 2)}


def test_prompt_dropout_empties_every_prompt_at_one_and_none_at_zero():
    """The prompts a training batch sees: all replaced by the empty prompt with dropout 1 (the unconditional branch
    of classifier-free guidance), each sample's own prompt with dropout 0."""
    samples = [TrainingSample(torch.zeros(1, 2, 2, 2), None, prompt, False) for prompt in (SOURCE, TARGET)]
    mu = torch.zeros(2, 1, 2, 2, 2)
    batch = torch.tensor([0, 1, 1, 0])
    assert _LatentData(samples, mu, mu, 1.0, None, 1.0).dropped_prompts(batch) == [Prompt.empty()] * 4
    assert _LatentData(samples, mu, mu, 1.0, None, 0.0).dropped_prompts(batch) == [SOURCE, TARGET, TARGET, SOURCE]


def test_the_controlnet_control_is_flipped_with_its_latents(tmp_path, monkeypatch):
    """Under flip augmentation a ControlNet step conditions the latents of the flipped image on the flipped mask: the
    control it sees is the sample's control flipped like the latents (here every draw flips axis I). The networks,
    the loss and the training loop are stand-ins that record what one step passes them."""
    from types import SimpleNamespace

    import medgen.synthesis.maskgen_training as training

    image, label = phantom(0, LUT_A)  # two spheres side by side along I: flipping I moves them
    sample = TrainingSample(image.as_tensor(), label.as_tensor(), Prompt("T1 MRI", organs=("liver", "kidney")), True)
    mu, flipped_mu = torch.zeros(1, 4, 2, 2, 2), torch.rand(1, 4, 2, 2, 2)
    data = _LatentData([sample], mu, torch.zeros_like(mu), 1.0, None, 0.0, {(0,): (flipped_mu, torch.zeros_like(mu))})
    monkeypatch.setattr(data, "random_flips", lambda count, axes: [(0,)] * count)
    seen = {}

    def one_step(model, loss_fn, dataset, optimizer, config, **kwargs):
        loss_fn(model, torch.tensor([0]))
        return SimpleNamespace(ema_model=None, step=1)

    monkeypatch.setattr(training, "build_controlnet", lambda *args: torch.nn.Linear(1, 1))
    monkeypatch.setattr(training, "controlnet_denoiser", lambda unet, controlnet, control, context: seen.update(control=control))
    monkeypatch.setattr(training, "noise_prediction_loss", lambda denoiser, scheduler, latents: seen.update(latents=latents))
    monkeypatch.setattr(training, "train_diffusion", one_step)
    encoder = SimpleNamespace(encode_prompts=lambda prompts: torch.zeros(len(prompts), 1, 8))
    training._controlnet_stage(data, SimpleNamespace(unet=None, prompt_encoder=encoder), 2,
                               MaskGenConfig.tiny(controlnet_flip_axes=(0,)), tmp_path, torch.device("cpu"), CallbackReporter())
    control = sample.control(MaskGenConfig.tiny().control_encoding)
    assert not torch.equal(control, control.flip(1))
    assert torch.equal(seen["latents"], flipped_mu) and torch.equal(seen["control"], control.flip(1)[None])


def test_flip_augmentation_encodes_each_flipped_image_and_changes_only_the_controlnet(model_dir, tmp_path):
    sources, targets = [phantom(s, LUT_A) for s in range(3)], [phantom(10 + s, LUT_B)[0] for s in range(3)]
    torch.manual_seed(0)  # as in model_dir: same data, networks and seed, only the ControlNet's samples are flipped
    train_maskgen(sources, targets, ["liver", "kidney"], tmp_path, MaskGenConfig.tiny(**FAST, controlnet_flip_axes=(0, 2)),
                  source_prompt=SOURCE, target_prompt=TARGET)
    model = MaskGenModel.load(tmp_path)
    assert model.config.controlnet_flip_axes == (0, 2)
    flipped = load_file(tmp_path / "flipped_latents.safetensors")
    assert sorted(flipped) == ["mu_flip0", "mu_flip02", "mu_flip2", "sigma_flip0", "sigma_flip02", "sigma_flip2"]
    images = torch.stack([image.as_tensor() for image, _ in sources] + [image.as_tensor() for image in targets]).float()
    with torch.no_grad():
        mu, sigma = model.vae.encode(flip_spatial(images, (0, 2)))
    torch.testing.assert_close(flipped["mu_flip02"], mu)
    torch.testing.assert_close(flipped["sigma_flip02"], sigma)
    for name in ("unet.safetensors", "vae.safetensors"):
        reference = load_file(model_dir / name)
        assert all(torch.equal(tensor, reference[key]) for key, tensor in load_file(tmp_path / name).items())
    reference = load_file(model_dir / "controlnet.safetensors")
    assert not all(torch.equal(tensor, reference[key]) for key, tensor in load_file(tmp_path / "controlnet.safetensors").items())


def test_unet_flip_augmentation_encodes_its_flips_and_changes_the_unet(model_dir, tmp_path):
    sources, targets = [phantom(s, LUT_A) for s in range(3)], [phantom(10 + s, LUT_B)[0] for s in range(3)]
    torch.manual_seed(0)  # as in model_dir: only the UNet's samples are flipped (and so the ControlNet sees another UNet)
    train_maskgen(sources, targets, ["liver", "kidney"], tmp_path, MaskGenConfig.tiny(**FAST, unet_flip_axes=(1,)),
                  source_prompt=SOURCE, target_prompt=TARGET)
    model = MaskGenModel.load(tmp_path)
    assert model.config.unet_flip_axes == (1,) and model.config.controlnet_flip_axes == ()
    assert sorted(load_file(tmp_path / "flipped_latents.safetensors")) == ["mu_flip1", "sigma_flip1"]
    reference = load_file(model_dir / "vae.safetensors")
    assert all(torch.equal(tensor, reference[key]) for key, tensor in load_file(tmp_path / "vae.safetensors").items())
    reference = load_file(model_dir / "unet.safetensors")
    assert not all(torch.equal(tensor, reference[key]) for key, tensor in load_file(tmp_path / "unet.safetensors").items())


def test_oracle4_controlnet_starts_as_the_unet():
    config = MaskGenConfig.tiny()
    torch.manual_seed(1)
    unet = build_latent_unet(config).eval()
    controlnet = build_controlnet(config, 2, unet).eval()
    assert torch.equal(controlnet.conv_in.conv.weight, unet.conv_in.conv.weight)
    x, t = torch.randn(2, 4, 4, 4, 4), torch.tensor([10, 900])
    context, control = torch.randn(2, 5, config.prompt_embedding_dim), torch.rand(2, 2, SIZE, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        down, mid = controlnet(x, t, control, context=context)
        assert all(not residual.any() for residual in [*down, mid])
        plain = unet(x, timesteps=t, context=context)
        steered = unet(x, timesteps=t, context=context, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert torch.equal(plain, steered)


@pytest.mark.parametrize("attention, prompt_reaches_level_0", [((True, True), True), ((False, True), False)])
def test_the_prompt_reaches_the_highest_resolution_controlnet_residual(attention, prompt_reaches_level_0):
    """The default puts cross-attention at every level: the residual the ControlNet adds after the first
    (highest-resolution) level changes with the prompt; with attention at the low level only it cannot,
    and the ControlNet would paint one contrast for every modality there."""
    assert MaskGenConfig.tiny().unet_attention == (True, True) and all(MaskGenConfig().unet_attention)
    config = MaskGenConfig.tiny(unet_attention=attention)
    torch.manual_seed(2)
    controlnet = build_controlnet(config, 2, build_latent_unet(config)).eval()
    with torch.no_grad():  # as if trained: zero-initialised convs and attention outputs pass features on
        for parameter in controlnet.parameters():
            if not parameter.any():
                parameter.normal_(std=0.1)
    x, t, control = torch.randn(1, 4, 4, 4, 4), torch.tensor([500]), torch.rand(1, 2, SIZE, SIZE, SIZE)
    with torch.no_grad():
        first, second = (controlnet(x, t, control, context=torch.randn(1, 5, config.prompt_embedding_dim))[0] for _ in range(2))
    # residual 0 is conv_in + the control embedding (prompt-free by design); residual 1 ends level 0
    assert torch.equal(first[0], second[0])
    assert (not torch.allclose(first[1], second[1], atol=1e-6)) == prompt_reaches_level_0
    assert not torch.allclose(first[-1], second[-1], atol=1e-6)


@pytest.mark.parametrize("vae_channels, control_channels, size", [((8, 16, 16), (8, 16, 32), 16), ((8, 16, 16, 16), (8, 16, 16, 32), 32)])
def test_oracle5_latent_and_residual_shapes(vae_channels, control_channels, size):
    config = MaskGenConfig.tiny(vae_channels=vae_channels, control_embedding_channels=control_channels)
    factor = config.downsample_factor
    with torch.no_grad():
        mu, _ = build_image_vae(config).encode(torch.rand(1, 1, size, size, size))
    assert tuple(mu.shape) == (1, config.latent_channels, size // factor, size // factor, size // factor)
    unet, latent = build_latent_unet(config), torch.randn(1, config.latent_channels, *mu.shape[2:])
    skips = []
    for block in unet.down_blocks:
        block.register_forward_hook(lambda module, args, output: skips.extend(output[1]))
    context, t = torch.randn(1, 5, config.prompt_embedding_dim), torch.tensor([3])
    with torch.no_grad():
        unet(latent, timesteps=t, context=context)
        down, mid = build_controlnet(config, 2, unet)(latent, t, torch.rand(1, 2, size, size, size), context=context)
    skips.insert(0, None)  # the UNet's conv_in output is the first skip connection; its shape is the latent grid's
    assert len(down) == len(skips)
    assert [tuple(r.shape) for r in down[1:]] == [tuple(s.shape) for s in skips[1:]]
    assert tuple(down[0].shape[2:]) == tuple(latent.shape[2:])
    assert mid.shape[2:] == skips[-1].shape[2:]


def test_control_embedding_must_match_the_vae_factor():
    with pytest.raises(BadInputError, match="downsample by the VAE factor 4, so it needs 3 widths"):
        MaskGenConfig.tiny(control_embedding_channels=(8, 16, 16, 32))


def test_mrgen_leading_timesteps():
    scheduler, timesteps = sampling_scheduler(MaskGenConfig(), 50)
    assert timesteps[:3] == [981, 961, 941] and timesteps[-1] == 1 and len(timesteps) == 50
    assert not scheduler.clip_sample and float(scheduler.final_alpha_cumprod) == float(scheduler.alphas_cumprod[0])


def _manual_sampling(model, label, denoiser_of, seed=0, steps=2):
    """An independent composition of the loop: noise, DDIM over MRGen's timesteps, decode."""
    scheduler, timesteps = sampling_scheduler(model.config, steps)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *model.document["latent_shape"]), generator=generator)
    control = control_tensor(label, 2)[None]
    z = sample(denoiser_of(control), scheduler, noise, timesteps=timesteps, generator=generator)
    with torch.no_grad():
        return model.vae.decode(z / model.scale_factor).clamp(0, 1)


def test_oracle6_guidance_one_and_zero_are_the_single_branches(model):
    label = phantom(0, LUT_A)[1]
    prompt = model.prompt("T2 MRI")
    with torch.no_grad():
        cond, uncond = model.prompt_encoder.encode_prompts([prompt]), model.prompt_encoder.encode_prompts([Prompt.empty()])

    def branch(context):
        return lambda control: controlnet_denoiser(model.unet, model.controlnet, control, context)

    generated = {}
    for scale, expected in ((1.0, branch(cond)), (0.0, branch(uncond))):
        generated[scale] = generate_on_model_grid(model, label, prompt, count=1, steps=2, guidance_scale=scale)
        assert torch.equal(generated[scale], _manual_sampling(model, label, expected)), scale
    assert not torch.equal(generated[1.0], generated[0.0])
    # scale 7 runs both branches as one doubled batch: the engine's sequential cfg_denoiser up to batching round-off
    guided = generate_on_model_grid(model, label, prompt, count=1, steps=2, guidance_scale=7.0)
    sequential = _manual_sampling(model, label, lambda c: cfg_denoiser(branch(cond)(c), branch(uncond)(c), 7.0))
    assert torch.allclose(guided, sequential, atol=1e-5)


def test_candidates_are_in_range_and_seeded(model_dir, model):
    label = phantom(1, LUT_A)[1]
    first = generate_candidates(model_dir, label, model.prompt("T2 MRI"), count=2, chunk=1, steps=2, seed=4)
    assert first.shape == (2, 1, SIZE, SIZE, SIZE) and 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(first, generate_candidates(model_dir, label, model.prompt("T2 MRI"), count=2, chunk=1, steps=2, seed=4))
    assert not torch.equal(first[0], first[1])


def test_mask_on_another_grid_comes_back_on_its_own_grid(model_dir, model):
    affine = oblique_affine(spacing=(1.5, 0.7, 1.1))
    _, label = phantom(2, LUT_A)
    label = MetaTensor(torch.nn.functional.interpolate(label.as_tensor()[None].float(), size=(12, 20, 14), mode="nearest")[0].long(),
                       affine=torch.from_numpy(affine))
    logs = []
    images = generate_candidates(model_dir, label, model.prompt("T2 MRI"), count=1, steps=2,
                                 reporter=CallbackReporter(lambda e: logs.append(e.get("message", ""))))
    assert images.shape == (1, 1, 12, 20, 14)
    assert any("resampled (nearest) to the model grid (16, 16, 16)" in message for message in logs)


def test_a_mask_stored_in_another_axis_order_reaches_the_model_as_its_training_cases_did(model):
    """Training lays cases out on RAS axes; a mask stored the other way round must too, or organs swap sides. A
    model folder trained in storage order (before MedGen did this) keeps getting masks in its grid's own order."""
    from types import SimpleNamespace

    _, label = phantom(3, LUT_A)
    for axis in range(3):
        grid_label, changed = model.to_model_grid(stored_reversed(label, axis))
        assert changed and torch.equal(grid_label.as_tensor(), label.as_tensor())
        assert torch.allclose(torch.as_tensor(grid_label.affine, dtype=torch.float64), model.grid_affine)
    older = SimpleNamespace(grid_affine=stored_reversed(label, 0).affine, grid_shape=model.grid_shape)  # an "LAS" grid
    grid_label, changed = MaskGenModel.to_model_grid(older, label)
    assert changed and torch.equal(grid_label.as_tensor(), label.as_tensor().flip(1))


def test_synthesis_filters_skips_and_reports(model_dir, tmp_path):
    affine = oblique_affine()
    _, mask = phantom(3, LUT_A, affine)
    oblique_mask = MetaTensor(mask.as_tensor()[:, :12, :14, :10], affine=torch.from_numpy(affine))
    empty = MetaTensor(torch.zeros_like(mask.as_tensor()), affine=torch.from_numpy(affine))
    m0 = phantom(4, LUT_A)[1]
    # organs in two corners of a field of view three times the model's: the centred crop loses them all
    corner = torch.zeros((1, 48, 48, 48), dtype=torch.int64)
    corner[:, :10, :10, :10] = 1
    corner[:, -10:, -10:, -10:] = 2
    corner = MetaTensor(corner, affine=m0.affine)
    # the liver in the centre, the kidney in a corner that the centred crop to 16³ cuts off: no image could show it
    half = torch.zeros((1, 32, 32, 32), dtype=torch.int64)
    half[:, 12:20, 12:20, 12:20] = 1
    half[:, :4, :4, :4] = 2
    half = MetaTensor(half, affine=m0.affine)
    # the 0.5 % rule is about the model grid: 112 organ voxels are 0.2 % of a wide 40³ mask but 2.7 % of the
    # 16³ grid (generated), while 13 voxels whole on a small 8³ mask are 0.3 % of the grid (skipped)
    wide, small = torch.zeros((1, 40, 40, 40), dtype=torch.int64), torch.zeros((1, 8, 8, 8), dtype=torch.int64)
    wide[:, 18:22, 18:22, 18:25] = 1
    small[:, 3:5, 3:5, 3:6], small[:, 6, 6, 6] = 1, 2
    wide, small = MetaTensor(wide, affine=m0.affine), MetaTensor(small, affine=m0.affine)
    masks = [("m0", m0), ("empty", empty), ("oblique", oblique_mask), ("corner", corner), ("half", half),
             ("wide", wide), ("small", small)]
    logs = []
    report = synthesize_from_masks(model_dir, masks, tmp_path, target_modality="T2 MRI", thresholds=ACCEPT_ALL,
                                   reporter=CallbackReporter(lambda e: logs.append(e.get("message", ""))), **QUICK)
    document = json.loads(report.report_path.read_text())
    statuses = {entry["mask_id"]: entry["status"] for entry in document["masks"]}
    assert statuses == {"m0": "accepted", "empty": "skipped: empty mask", "oblique": "accepted",
                        "corner": "skipped: organs outside the model grid", "half": "skipped: kidney outside the model grid",
                        "wide": "accepted", "small": "skipped: organs too small on the model grid"}
    assert any("'small' skipped: its organs cover 0.32% of the model grid (16, 16, 16), at most 0.5%" in m for m in logs)
    assert any("'corner' skipped: on the model grid (16, 16, 16)" in message for message in logs)
    assert document["prompt"] == "T2 MRI, abdomen, liver, kidney" and document["accepted_pairs"] == 6
    for entry in document["masks"][:3:2]:
        assert [c["candidate"] for c in entry["candidates"]] == [0, 1]
        assert all(c["decision"] == "accepted" and set(c["organ_iou"]) == {"liver", "kidney"} for c in entry["candidates"])
    # the oblique mask is 25 mm deep along K (2.5 mm voxels), the model grid 16 mm: the pair is the covered 7 slices
    image = load_volume(tmp_path / "oblique_0_image.nii.gz")
    label = load_volume(tmp_path / "oblique_0_label.nii.gz", label=True)
    assert image.shape == label.shape == (1, 12, 14, 7) and np.allclose(image.affine.numpy(), label.affine.numpy())
    first_voxel = np.linalg.inv(affine) @ label.affine.numpy()[:, 3]
    assert np.allclose(first_voxel, [0, 0, 1, 1], atol=1e-5)
    assert np.allclose(label.affine.numpy()[:3, :3], affine[:3, :3], atol=1e-5)
    assert torch.equal(label.as_tensor(), oblique_mask.as_tensor()[..., 1:8])
    assert (tmp_path / "labels.json").is_file() and len(report.pairs) == 6


def test_a_mask_beyond_the_field_of_view_gives_pairs_on_the_covered_part_only(model_dir, tmp_path):
    """A mask 40 voxels long on the model's spacing is cropped to the model's 16 around its centre; its pairs hold
    the generated 16 (voxels 12..27), not 24 more of repeated edge voxels under the label."""
    affine = torch.from_numpy(oblique_affine(spacing=(1.0, 1.0, 1.0)))
    _, label = phantom(5, LUT_A)
    wide = torch.zeros((1, 40, 16, 16), dtype=torch.int64)
    wide[:, 12:28] = label.as_tensor()
    wide[:, :12][label.as_tensor()[:, :12] == 1] = 1  # organ voxels outside the field of view, too
    wide = MetaTensor(wide, affine=affine)
    logs = []
    report = synthesize_from_masks(model_dir, [("wide", wide)], tmp_path, target_modality="T2 MRI", thresholds=ACCEPT_ALL,
                                   reporter=CallbackReporter(lambda e: logs.append(e.get("message", ""))), **QUICK)
    assert len(report.pairs) == 2
    image = load_volume(tmp_path / "wide_0_image.nii.gz")
    pair_label = load_volume(tmp_path / "wide_0_label.nii.gz", label=True)
    shifted = affine.clone()
    shifted[:3, 3] += 12 * affine[:3, 0]
    assert image.shape == pair_label.shape == (1, 16, 16, 16)
    assert np.allclose(image.affine.numpy(), shifted.numpy(), atol=1e-5)
    assert np.allclose(pair_label.affine.numpy(), shifted.numpy(), atol=1e-5)
    assert torch.equal(pair_label.as_tensor(), wide.as_tensor()[:, 12:28])
    assert any("reaches beyond the model's field of view" in message for message in logs)


def test_the_controlnet_strength_reaches_the_candidates_and_the_report(model_dir, model, tmp_path):
    _, mask = phantom(8, LUT_A)
    report = synthesize_from_masks(model_dir, [("m0", mask)], tmp_path, target_modality="T2 MRI", thresholds=ACCEPT_ALL,
                                   conditioning_scale=20.0, **QUICK)
    assert json.loads(report.report_path.read_text())["conditioning_scale"] == 20.0
    written = load_volume(tmp_path / "m0_0_image.nii.gz").as_tensor()
    from medgen.synthesis.maskgen import mask_seed

    kwargs = dict(count=2, chunk=2, steps=2, guidance_scale=7.0, seed=mask_seed(0, 0))
    # the fixture's ControlNet trained 60 steps from zero init: its residuals are small, so amplify them
    strong = generate_candidates(model_dir, mask, model.prompt("T2 MRI"), conditioning_scale=20.0, **kwargs)
    as_trained = generate_candidates(model_dir, mask, model.prompt("T2 MRI"), **kwargs)
    torch.testing.assert_close(written, strong[0], atol=1e-6, rtol=0)
    assert (strong - as_trained).abs().max() > 1e-3


def test_each_pair_holds_its_own_candidate_and_each_mask_its_own_seed(model_dir, model, tmp_path):
    """Two identical masks, two candidates each, all accepted: pair <mask>_<k> holds candidate k of its mask, and
    mask i is generated with its own seed (recorded in the report), so the second mask's images are new ones, not
    copies of the first's, and no pair repeats another's image. Nearby run seeds share no mask seed: with seed + i,
    run seed 1's first mask repeated run seed 0's second."""
    from medgen.synthesis.maskgen import mask_seed

    _, mask = phantom(9, LUT_A)
    report = synthesize_from_masks(model_dir, [("a", mask), ("b", mask.clone())], tmp_path, target_modality="T2 MRI",
                                   thresholds=ACCEPT_ALL, **QUICK)
    assert len(report.pairs) == 4
    recorded = {entry["mask_id"]: entry["seed"] for entry in json.loads(report.report_path.read_text())["masks"]}
    assert recorded == {"a": mask_seed(0, 0), "b": mask_seed(0, 1)}
    written = {stem: load_volume(tmp_path / f"{stem}_image.nii.gz").as_tensor() for stem in ("a_0", "a_1", "b_0", "b_1")}
    for mask_id, seed in recorded.items():
        expected = generate_candidates(model_dir, mask, model.prompt("T2 MRI"), count=2, chunk=2, steps=2, seed=seed)
        for k in range(2):
            torch.testing.assert_close(written[f"{mask_id}_{k}"], expected[k], atol=1e-6, rtol=0)
    images = list(written.values())
    assert all((images[i] - images[j]).abs().max() > 1e-3 for i in range(4) for j in range(i + 1, 4))
    seeds = [mask_seed(run_seed, index) for run_seed in range(20) for index in range(20)]
    assert len(set(seeds)) == len(seeds) and all(0 <= seed < 2**63 for seed in seeds)


def test_strict_thresholds_reject_and_say_why(model_dir, tmp_path):
    report = synthesize_from_masks(model_dir, [("m0", phantom(5, LUT_A)[1])], tmp_path, target_modality="T2 MRI",
                                   thresholds=FilterThresholds(avg_confidence=1.0, avg_iou=1.0, organ_iou=1.0, organ_confidence=1.0), **QUICK)
    entry = json.loads(report.report_path.read_text())["masks"][0]
    assert entry["status"] == "none accepted" and entry["path"] == "none" and report.pairs == []
    assert all(c["decision"] == "rejected" and "fails the relaxed thresholds" in c["reason"] for c in entry["candidates"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.json", "report.json"]


def test_a_segmentation_model_folder_can_be_the_checker(model_dir, tmp_path):
    """Any MedGen segmentation model folder whose classes include the organs (matched by name) scores the candidates;
    one missing an organ, or a folder that is no model, is refused before anything is generated."""
    from monai.networks.nets import UNet

    from medgen.models import save_model
    from medgen_testing import TINY_UNET_KWARGS, tiny_unet_spec

    kwargs = {**TINY_UNET_KWARGS, "out_channels": 4}
    torch.manual_seed(0)
    save_model(UNet(**kwargs), tiny_unet_spec(kwargs=kwargs, class_names=["background", "Kidney", "spleen", "LIVER"]),
               tmp_path / "segmenter")
    report = synthesize_from_masks(model_dir, [("m0", phantom(5, LUT_A)[1])], tmp_path / "out", target_modality="T2 MRI",
                                   checker=tmp_path / "segmenter", thresholds=ACCEPT_ALL, **QUICK)
    entry = json.loads(report.report_path.read_text())["masks"][0]
    assert len(entry["candidates"]) == 2 and entry["status"] == "accepted"
    assert all(set(candidate["organ_iou"]) == {"liver", "kidney"} for candidate in entry["candidates"])
    save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(), tmp_path / "blob segmenter")
    with pytest.raises(BadInputError, match=r"does not segment the organs \['liver', 'kidney'\]: its classes are \['blob'\]"):
        synthesize_from_masks(model_dir, [("m0", phantom(5, LUT_A)[1])], tmp_path / "out2", target_modality="T2 MRI",
                              checker=tmp_path / "blob segmenter", **QUICK)
    with pytest.raises(ModelError, match="No checker in .*a MedGen segmentation model folder"):
        synthesize_from_masks(model_dir, [("m0", phantom(5, LUT_A)[1])], tmp_path / "out3", target_modality="T2 MRI",
                              checker=tmp_path, **QUICK)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_unknown_organs_and_modalities_are_bad_input(model_dir, tmp_path):
    label = phantom(0, LUT_A)[1].clone()
    label[0, 0, 0, 0] = 5
    with pytest.raises(BadInputError, match=r"label values \[5\].*\{1: 'liver', 2: 'kidney'\}"):
        synthesize_from_masks(model_dir, [("bad", label)], tmp_path, target_modality="T2 MRI", **QUICK)
    with pytest.raises(BadInputError, match=r"'CT'.*\['T1 MRI', 'T2 MRI'\]"):
        synthesize_from_masks(model_dir, [("ok", phantom(0, LUT_A)[1])], tmp_path, target_modality="CT", **QUICK)
    with pytest.raises(BadInputError, match="longer than 150 bytes cannot name their pairs"):  # before any generation
        synthesize_from_masks(model_dir, [("x" * 151, phantom(0, LUT_A)[1])], tmp_path, target_modality="T2 MRI", **QUICK)
    assert not list(tmp_path.glob("*.nii.gz"))


def test_a_model_with_unknown_settings_is_a_model_error(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    document = json.loads((folder / "medgen_model.json").read_text())
    document["config"]["setting_from_a_newer_version"] = 1
    (folder / "medgen_model.json").write_text(json.dumps(document))
    with pytest.raises(ModelError, match=r"Unknown mask-model settings \['setting_from_a_newer_version'\]"):
        MaskGenModel.load(folder)


def test_cancelling_keeps_the_accepted_pairs(model_dir, tmp_path):
    reporter = CallbackReporter(should_stop=lambda: any(tmp_path.glob("*_image.nii.gz")))
    with pytest.raises(CancelledError):
        synthesize_from_masks(model_dir, [("first", phantom(6, LUT_A)[1]), ("second", phantom(7, LUT_A)[1])], tmp_path,
                              target_modality="T2 MRI", thresholds=ACCEPT_ALL, reporter=reporter, **QUICK)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "first_0_image.nii.gz", "first_0_label.nii.gz", "first_1_image.nii.gz", "first_1_label.nii.gz", "labels.json", "report.json"]
    assert [entry["mask_id"] for entry in json.loads((tmp_path / "report.json").read_text())["masks"]] == ["first"]


def test_conditioning_embedding_passes_the_mask_to_its_zero_conv():
    """The mask must still vary spatially where the zero ``conv_out`` reads it, or the ControlNet cannot learn
    to follow it (measured: MONAI's default init shrank the feature std ~5x per conv, to 3e-4)."""
    torch.manual_seed(0)
    config = MaskGenConfig.tiny()
    embedding = build_controlnet(config, control_channels=2).controlnet_cond_embedding
    label = torch.zeros(1, 16, 16, 16, dtype=torch.int64)
    label[0, 3:9, 3:9, 3:9], label[0, 10:14, 9:14, 4:8] = 1, 2
    features = embedding.conv_in(control_tensor(label, 2)[None])
    for block in embedding.blocks:
        features = block(features)
    assert float(features.std(dim=(2, 3, 4)).mean()) > 0.05
    assert not embedding.conv_out.conv.weight.any()  # still a zero convolution


class _HashTextTower(torch.nn.Module):
    """Stand-in for a local text model: a frozen embedding of each text's character codes, ``(B, 4, E)``."""

    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.table = torch.nn.Embedding(128, width)
        self.calls = 0

    def forward(self, texts):
        self.calls += 1
        codes = torch.tensor([[ord(c) % 128 for c in (text + "    ")[:4]] for text in texts])
        return self.table(codes)


def test_a_local_text_model_conditions_training_and_is_needed_again_to_load(tmp_path, model_dir):
    from medgen.synthesis.prompts import FrozenTextEncoder

    config = MaskGenConfig.tiny(**FAST)
    torch.manual_seed(0)
    tower = _HashTextTower(config.prompt_embedding_dim)
    encoder = FrozenTextEncoder(tower, context_length=4, embedding_dim=config.prompt_embedding_dim)
    sources, targets = [phantom(seed, LUT_A) for seed in range(2)], [phantom(10 + seed, LUT_B)[0] for seed in range(2)]
    with pytest.raises(BadInputError, match="embedding width 3 must equal"):
        train_maskgen(sources, targets, ["liver", "kidney"], tmp_path / "narrow", config, source_prompt=SOURCE, target_prompt=TARGET,
                      prompt_encoder=FrozenTextEncoder(tower, context_length=4, embedding_dim=3))
    folder = train_maskgen(sources, targets, ["liver", "kidney"], tmp_path / "text", config, source_prompt=SOURCE,
                           target_prompt=TARGET, prompt_encoder=encoder)
    # the frozen text model is in no checkpoint and no weights file; each distinct prompt was encoded once
    assert json.loads((folder / "medgen_model.json").read_text())["prompt_encoder"] == {
        "kind": "text", "context_length": 4, "embedding_dim": config.prompt_embedding_dim}
    assert not (folder / "prompt_encoder.safetensors").exists()
    assert not [key for key in load_file(str(folder / "unet.safetensors")) if "table" in key or "prompt_encoder" in key]
    assert tower.calls <= 3  # source, target and empty prompt, each once
    with pytest.raises(ModelError, match="trained with a local text model"):
        MaskGenModel.load(folder)
    with pytest.raises(ModelError, match="returns 5 x"):
        MaskGenModel.load(folder, prompt_encoder=FrozenTextEncoder(tower, context_length=5, embedding_dim=config.prompt_embedding_dim))
    label = phantom(20, LUT_A)[1]
    images = generate_candidates(folder, label, TARGET, count=2, chunk=2, steps=2, prompt_encoder=encoder)
    assert images.shape == (2, 1, SIZE, SIZE, SIZE) and torch.isfinite(images).all()
    with pytest.raises(ModelError, match="learned prompt table"):
        MaskGenModel.load(model_dir, prompt_encoder=encoder)


def test_training_again_with_other_settings_is_refused_but_the_controlnet_may_train_longer(model_dir, tmp_path):
    sources, targets = [phantom(s, LUT_A) for s in range(3)], [phantom(10 + s, LUT_B)[0] for s in range(3)]
    for steps in (0, 2, 1):  # as the fidelity bench trains: the ControlNet stage continued in the same folder
        train_maskgen(sources[:2], targets[:2], ["liver", "kidney"], tmp_path, MaskGenConfig.tiny(**{**FAST, "controlnet_steps": steps}),
                      source_prompt=SOURCE, target_prompt=TARGET)
    # asked for 1 step after 2: the weights keep their 2 steps, and so does the record
    assert json.loads((tmp_path / "medgen_model.json").read_text())["config"]["controlnet_steps"] == 2
    with pytest.raises(BadInputError, match=r"other settings or data \(unet_steps 4 -> 6\)"):
        train_maskgen(sources, targets, ["liver", "kidney"], model_dir, MaskGenConfig.tiny(**{**FAST, "unet_steps": 6}),
                      source_prompt=SOURCE, target_prompt=TARGET)
    with pytest.raises(BadInputError, match=r"prompts .*'T2 MRI'.*'FLAIR MRI'"):
        train_maskgen(sources, targets, ["liver", "kidney"], model_dir, MaskGenConfig.tiny(**FAST),
                      source_prompt=SOURCE, target_prompt=Prompt("FLAIR MRI", region="abdomen"))
    # an empty 'spleen' segment: no source shows it, so no generated image could (refused before any stage)
    with pytest.raises(BadInputError, match=r"Organs \['spleen'\] have no voxel in any prepared source label map"):
        train_maskgen(sources, targets, ["liver", "kidney", "spleen"], tmp_path / "spleen", MaskGenConfig.tiny(**FAST),
                      source_prompt=SOURCE, target_prompt=TARGET)
    assert not (tmp_path / "spleen").exists()


def test_masks_the_model_cannot_read_and_checkers_of_other_organs_are_refused(model_dir, model, tmp_path):
    from medgen.synthesis.checker import load_checker

    with pytest.raises(BadInputError, match="plain tensor of shape \\(12, 12, 12\\), not the model grid"):
        model.checked_mask(torch.zeros((1, 12, 12, 12), dtype=torch.int64), "The mask")
    on_grid = model.checked_mask(phantom(2, LUT_A)[1].as_tensor(), "The mask")  # a plain tensor on the grid: its affine
    assert isinstance(on_grid, MetaTensor) and torch.equal(on_grid.affine.double(), model.grid_affine)
    with pytest.raises(BadInputError, match="non-integer values"):
        model.checked_mask(phantom(2, LUT_A)[1].float() * 0.5, "The mask")
    for shape in ((16, 16, 16), (2, 16, 16, 16)):  # checked before any mask is generated from
        with pytest.raises(BadInputError, match=rf"Mask 'b' has shape \({shape[0]}, .*a mask is one label map \(1, I, J, K\)"):
            synthesize_from_masks(model_dir, [("a", phantom(2, LUT_A)[1]), ("b", MetaTensor(torch.zeros(shape)))],
                                  tmp_path / "out", target_modality="T2 MRI", **QUICK)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("a_*"))
    with pytest.raises(ModelError, match=r"trained on the organs \['liver', 'kidney'\].*masks use \['kidney', 'liver'\]"):
        load_checker(model_dir / "checker", organ_names=["kidney", "liver"])
