"""Generator (3D DDPM) fine-tuning with TenVOO, as in the TenVOO paper, on a tiny MONAI UNet."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from medgen_testing import stored_reversed
from monai.networks.nets import DiffusionModelUNet

from monai.networks.schedulers import DDPMScheduler

from medgen.adapt.generator import DiffusionSettings, GeneratorFinetuneConfig, finetune_generator, sample_volumes
from medgen.errors import BadInputError, ModelError
from medgen.models import ModelSpec
from medgen.models.spec import DIFFUSION_FIELDS
from medgen.peft import inject, load_adapter, save_adapter, trainable_parameters


def _unet():
    torch.manual_seed(0)
    unet = DiffusionModelUNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16), attention_levels=(False, False),
                              num_res_blocks=1, norm_num_groups=8)
    with torch.no_grad():  # MONAI zero-initialises the output convs; a "pretrained" model is not
        for parameter in unet.parameters():
            if parameter.abs().sum() == 0:
                parameter.normal_(0, 0.02)
    return unet


def _volumes(count=3):
    generator = torch.Generator().manual_seed(1)
    grid = torch.linspace(-1, 1, 8)
    sphere = ((grid.view(-1, 1, 1) ** 2 + grid.view(1, -1, 1) ** 2 + grid.view(1, 1, -1) ** 2) < 0.5).float()
    return [(sphere * 0.8 + 0.1 * torch.rand((8, 8, 8), generator=generator))[None] for _ in range(count)]


def test_tenvoo_generator_finetuning_trains_only_the_adapter_and_lowers_the_loss(tmp_path):
    unet = _unet()
    frozen_before = {name: p.detach().clone() for name, p in unet.named_parameters()}
    inject(unet, "tenvoo-l", rank=2, exclude_first_last_conv=False)
    assert 0 < trainable_parameters(unet) < sum(p.numel() for p in frozen_before.values())
    config = GeneratorFinetuneConfig(steps=2, lr=1e-3, amp=False, checkpoint_every=100)
    short = DiffusionSettings(num_train_timesteps=50)
    first = finetune_generator(unet, _volumes(), config, checkpoint_dir=tmp_path / "a", diffusion=short)
    config.steps = 12
    last = finetune_generator(unet, _volumes(), config, checkpoint_dir=tmp_path / "a", diffusion=short)
    assert last < first
    # the volumes, the learning rate and the base weights must stay on a resume (steps may grow)
    with pytest.raises(BadInputError, match="other training data"):
        finetune_generator(unet, _volumes(2), config, checkpoint_dir=tmp_path / "a", diffusion=short)
    with pytest.raises(BadInputError, match="lr 0.001 -> 0.01"):
        finetune_generator(unet, _volumes(), dataclasses.replace(config, lr=1e-2), checkpoint_dir=tmp_path / "a", diffusion=short)
    for name, parameter in unet.named_parameters():
        base_name = name.replace(".base_layer", "")
        if not parameter.requires_grad and base_name in frozen_before:
            assert torch.equal(parameter, frozen_before[base_name]), name
    save_adapter(unet, tmp_path / "adapter")
    reloaded = load_adapter(_unet(), tmp_path / "adapter")
    x, t = torch.randn(1, 1, 8, 8, 8), torch.tensor([10])
    assert torch.allclose(unet.eval()(x, t), reloaded.eval()(x, t), atol=1e-5)


def test_sampling_gives_volumes_in_range_deterministically():
    unet = _unet()
    short = DiffusionSettings(num_train_timesteps=20)
    a = sample_volumes(unet, 2, (8, 8, 8), diffusion=short, seed=3)
    b = sample_volumes(unet, 2, (8, 8, 8), diffusion=short, seed=3)
    assert a.shape == (2, 1, 8, 8, 8) and torch.equal(a, b)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    assert not torch.equal(a, sample_volumes(unet, 2, (8, 8, 8), diffusion=short, seed=4))  # the seed decides the draw


def test_default_diffusion_settings_are_the_tenvoo_papers():
    """Spec tenvoo.md §7.2: scaled_linear_beta 0.0005..0.0195, T = 1000; a spec without the field gets them."""
    scheduler = DiffusionSettings.from_spec(ModelSpec(network="DiffusionModelUNet")).scheduler()
    paper = DDPMScheduler(num_train_timesteps=1000, schedule="scaled_linear_beta", beta_start=0.0005, beta_end=0.0195)
    assert torch.equal(scheduler.betas, paper.betas) and scheduler.prediction_type == "epsilon"
    assert float(scheduler.alphas_cumprod[500]) == pytest.approx(0.226, abs=5e-4)
    assert DiffusionSettings().intensity_range == (0.0, 1.0)
    assert {field.name for field in dataclasses.fields(DiffusionSettings)} == set(DIFFUSION_FIELDS)


def test_diffusion_settings_come_from_the_spec():
    diffusion = {"schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02, "num_train_timesteps": 30,
                 "intensity_range": [-1, 1]}
    settings = DiffusionSettings.from_spec(ModelSpec(network="DiffusionModelUNet", diffusion=diffusion))
    assert settings == DiffusionSettings("linear_beta", 1e-4, 0.02, 30, (-1.0, 1.0))
    assert torch.equal(settings.scheduler().betas, DDPMScheduler(num_train_timesteps=30, schedule="linear_beta").betas)


@pytest.mark.parametrize("network, diffusion, message", [
    ("DiffusionModelUNet", {"T": 1000}, r"unknown fields \['T'\]"),
    ("DiffusionModelUNet", {"schedule": "cosine"}, "schedule 'cosine' is not supported"),
    ("DiffusionModelUNet", {"beta_start": 0.02}, "beta_start and beta_end together"),
    ("DiffusionModelUNet", {"beta_start": 0.02, "beta_end": 0.001}, r"beta_start \(0.02\) must be below beta_end"),
    ("DiffusionModelUNet", {"beta_start": 0, "beta_end": 0.02}, r"beta_start must be a number in \(0, 1\), found 0"),
    ("DiffusionModelUNet", {"num_train_timesteps": True}, "num_train_timesteps must be an integer >= 2, found True"),
    ("DiffusionModelUNet", {"intensity_range": [1, 0]}, r"intensity_range must be \[lo, hi\] with lo < hi"),
    ("UNet", {"num_train_timesteps": 10}, "describes a DDPM generator, but the network is a UNet"),
])
def test_bad_diffusion_field_is_a_clear_model_error(network, diffusion, message):
    with pytest.raises(ModelError, match=message):
        ModelSpec(network=network, diffusion=diffusion)


def test_intensity_range_round_trip_and_sampling_range():
    settings = DiffusionSettings(num_train_timesteps=10, intensity_range=(-1.0, 1.0))
    volumes = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(settings.to_model_range(torch.tensor([0.0, 0.5, 1.0])), torch.tensor([-1.0, 0.0, 1.0]))
    model_range = settings.to_model_range(volumes)
    assert torch.allclose(settings.from_model_range(model_range), volumes, atol=1e-6)
    samples = sample_volumes(_unet(), 1, (8, 8, 8), diffusion=settings)
    assert 0.0 <= float(samples.min()) and float(samples.max()) <= 1.0


def test_volumes_of_different_shapes_are_refused(tmp_path):
    with pytest.raises(BadInputError, match="share one shape"):
        finetune_generator(_unet(), [torch.rand(1, 8, 8, 8), torch.rand(1, 8, 8, 6)], GeneratorFinetuneConfig(steps=1), checkpoint_dir=tmp_path)


def test_generators_see_a_scan_on_ras_axes_whatever_its_storage_order(oblique):
    """Spec tenvoo.md §7.3 trains DDPM generators on RAS-oriented volumes: a scan stored another way round must not
    reach them mirrored, and samples drawn on its grid are placed in space by the oriented affine."""
    from monai.data import MetaTensor

    from medgen.adapt.jobs import _scaled_to_grid
    from medgen.io import axis_codes

    scan = MetaTensor(_volumes(1)[0] * 300, affine=torch.from_numpy(oblique))
    expected = _scaled_to_grid(scan, (8, 8, 8))
    assert axis_codes(expected.affine) == "RAS"
    for axis in range(3):
        seen = _scaled_to_grid(stored_reversed(scan, axis), (8, 8, 8))
        assert torch.allclose(seen.as_tensor(), expected.as_tensor(), atol=1e-6)
        assert torch.allclose(torch.as_tensor(seen.affine), torch.as_tensor(expected.affine), atol=1e-9)


def test_generator_jobs_through_the_worker(tmp_path, oblique):
    from monai.data import MetaTensor

    from medgen.io import load_volume, save_volume
    from medgen.jobs.exit_codes import ExitCode
    from medgen.models import save_model
    from medgen.slicer.runner import run_job_blocking, write_job

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [8, 16], "attention_levels": [False, False],
              "num_res_blocks": 1, "norm_num_groups": 8}
    spec = ModelSpec(network="DiffusionModelUNet", kwargs=kwargs, name="tiny-ddpm", diffusion={"num_train_timesteps": 20})
    save_model(_unet(), spec, tmp_path / "ddpm")
    paths = [str(save_volume(MetaTensor(v, affine=torch.from_numpy(oblique)), tmp_path / f"v{i}.nii.gz")) for i, v in enumerate(_volumes(2))]
    params = {"shape": [8, 8, 8]}
    tune = run_job_blocking(write_job(tmp_path / "jobs", "finetune-generator", {"volumes": paths, "model_folder": str(tmp_path / "ddpm")},
                                      {**params, "method_options": {"rank": 2, "exclude_first_last_conv": False}, "steps": 3}), timeout_s=600)
    assert tune.returncode == ExitCode.OK, tune.error
    assert tune.result["diffusion"]["num_train_timesteps"] == 20  # from the folder's spec, the rest the paper's
    assert tune.result["diffusion"]["schedule"] == "scaled_linear_beta"
    draw = run_job_blocking(write_job(tmp_path / "jobs", "sample-generator", {"model_folder": str(tmp_path / "ddpm"),
                                      "adapter": tune.result["outputs"]["adapter"], "reference": paths[0]}, {**params, "count": 2}), timeout_s=600)
    assert draw.returncode == ExitCode.OK, draw.error
    sample = load_volume(draw.result["outputs"]["volume_0001"])
    assert sample.shape == (1, 8, 8, 8) and 0.0 <= float(sample.min()) and float(sample.max()) <= 1.0
    # FID of the samples against the training volumes: the base generator's own encoder gives the features
    samples = sorted(draw.result["outputs"].values())
    evaluate = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"model_folder": str(tmp_path / "ddpm"),
                                                                          "real": paths, "generated": samples}), timeout_s=300)
    assert evaluate.returncode == ExitCode.OK, evaluate.error
    report = json.loads(Path(evaluate.result["outputs"]["report"]).read_text())
    features = report["feature_network"]
    assert (features["name"], features["source"], features["feature_dim"]) == ("tiny-ddpm", "base model", 16)
    assert features["layer"].startswith("middle_block.") and "weights SHA-256 " in features["weights"]
    assert report["fid"] >= 0 and (report["real_count"], report["generated_count"]) == (2, 2)
    # real volumes in scanner units are scaled as in training, as the samples are: the same FID at 1000x
    scanner = [str(save_volume(MetaTensor(load_volume(path).as_tensor() * 1000, affine=torch.from_numpy(oblique)),
                               tmp_path / f"scanner{index}.nii.gz")) for index, path in enumerate(paths)]
    rescaled = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"model_folder": str(tmp_path / "ddpm"),
                                                                          "real": scanner, "generated": samples}), timeout_s=300)
    assert rescaled.returncode == ExitCode.OK, rescaled.error
    assert rescaled.result["fid"] == pytest.approx(report["fid"], rel=1e-3, abs=1e-6)
    # refused before any work: a shape the two-level UNet cannot halve, and a constant training volume
    odd = run_job_blocking(write_job(tmp_path / "jobs", "sample-generator", {"model_folder": str(tmp_path / "ddpm")},
                                     {**params, "shape": [5, 8, 8], "count": 1}), timeout_s=300)
    assert odd.returncode == ExitCode.BAD_INPUT and "multiple of 2 (e.g. (4, 8, 8))" in odd.error["message"]
    flat = str(save_volume(MetaTensor(torch.full((1, 8, 8, 8), 3.0), affine=torch.from_numpy(oblique)), tmp_path / "flat.nii.gz"))
    constant = run_job_blocking(write_job(tmp_path / "jobs", "finetune-generator", {"volumes": [paths[0], flat], "model_folder": str(tmp_path / "ddpm")},
                                          {**params, "steps": 1}), timeout_s=300)
    assert constant.returncode == ExitCode.BAD_INPUT and "flat.nii.gz is constant (every voxel 3)" in constant.error["message"]


def test_fid_with_a_user_supplied_feature_network_names_it(tmp_path, oblique):
    from monai.data import MetaTensor
    from monai.networks.nets import UNet

    from medgen.io import save_volume
    from medgen.jobs.exit_codes import ExitCode
    from medgen.models import ModelSpec, save_model
    from medgen.slicer.runner import run_job_blocking, write_job

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
    save_model(UNet(**kwargs), ModelSpec(network="UNet", kwargs=kwargs, name="feature unet"), tmp_path / "features")
    affine = torch.from_numpy(oblique)
    paths = [str(save_volume(MetaTensor(volume, affine=affine), tmp_path / f"v{i}.nii.gz")) for i, volume in enumerate(_volumes(4))]
    inputs = {"feature_model_folder": str(tmp_path / "features"), "real": paths[:2], "generated": paths[2:]}
    job = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", inputs, {"feature_layer": "model.0.conv"}), timeout_s=300)
    assert job.returncode == ExitCode.OK, job.error
    features = job.result["feature_network"]
    assert (features["name"], features["layer"], features["source"], features["feature_dim"]) == (
        "feature unet", "model.0.conv", "user-supplied", 4)
    # both sets are scaled alike: real volumes in scanner units do not count as a difference from samples in [0, 1]
    scanner = [str(save_volume(MetaTensor(volume * 1000, affine=affine), tmp_path / f"s{i}.nii.gz"))
               for i, volume in enumerate(_volumes(4)[:2])]
    rescaled = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {**inputs, "real": scanner},
                                          {"feature_layer": "model.0.conv"}), timeout_s=300)
    assert rescaled.result["fid"] == pytest.approx(job.result["fid"], rel=1e-3, abs=1e-6)
    with pytest.raises(BadInputError, match="'generated' is a dependency of 'real'"):  # refused before any job starts
        write_job(tmp_path / "jobs", "evaluate", {"real": paths[:2]})
    # no folder: the packaged deepbet encoder, fed through deepbet's own resizing and normalisation
    default = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"real": paths[:2], "generated": paths[2:]}), timeout_s=300)
    assert default.returncode == ExitCode.OK, default.error
    assert default.result["feature_network"]["name"] == "deepbet-bbox" and default.result["fid"] >= 0


def test_fid_with_the_base_segmentation_model_uses_its_own_preprocessing(tmp_path, oblique):
    """A segmentation model folder as the base: its own percentile normalisation makes the features blind to the
    scanner's intensity scale, so the same volumes at 1000x intensity are at FID 0 from themselves."""
    from monai.data import MetaTensor
    from monai.networks.nets import UNet

    from medgen.io import save_volume
    from medgen.jobs.exit_codes import ExitCode
    from medgen.models import save_model
    from medgen.slicer.runner import run_job_blocking, write_job
    from medgen_testing import TINY_UNET_KWARGS, tiny_unet_spec

    kwargs = {**TINY_UNET_KWARGS, "norm": "batch"}  # eval-mode BatchNorm: the features follow the input's scale
    torch.manual_seed(0)
    save_model(UNet(**kwargs), tiny_unet_spec(kwargs=kwargs), tmp_path / "base")
    affine = torch.from_numpy(oblique)
    volumes = _volumes(2)
    real = [str(save_volume(MetaTensor(v * 1000, affine=affine), tmp_path / f"r{i}.nii.gz")) for i, v in enumerate(volumes)]
    generated = [str(save_volume(MetaTensor(v, affine=affine), tmp_path / f"g{i}.nii.gz")) for i, v in enumerate(volumes)]
    job = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"model_folder": str(tmp_path / "base"),
                                                                     "real": real, "generated": generated}), timeout_s=300)
    assert job.returncode == ExitCode.OK, job.error
    assert job.result["feature_network"]["source"] == "base model" and job.result["fid"] == pytest.approx(0, abs=1e-6)
    # a collapsed generator's constant volume: the base model cannot normalise it, and the message says what to do
    flat = str(save_volume(MetaTensor(torch.full_like(volumes[0], 0.5), affine=affine), tmp_path / "flat.nii.gz"))
    refused = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"model_folder": str(tmp_path / "base"), "real": real,
                                                                         "generated": [generated[0], flat]}), timeout_s=300)
    assert refused.returncode == ExitCode.BAD_INPUT
    assert ("flat.nii.gz is constant (every voxel 0.5), as a collapsed generator writes" in refused.error["message"]
            and "feature_model_folder" in refused.error["message"])
