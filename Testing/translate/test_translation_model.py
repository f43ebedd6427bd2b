"""LMI-conditioned translation model: training on the target modality only, zero-shot translation, SDEdit."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from monai.data import MetaTensor
from safetensors.torch import load_file

from medgen.errors import BadInputError, ModelError
from medgen.io.model_folder import RUN_JSON, read_model_json
from medgen.translate.model import (
    TASK, TranslationConfig, lmi_agreement, ras_axes, to_model_grid, train_translation, translate_volume,
)
from medgen_testing import oblique_affine

TINY = dict(grid=(16, 16, 8), channels=(8, 16), steps=6, batch_size=4)


def _phantom(seed: int, contrast=(0.2, 0.5, 0.9)) -> MetaTensor:
    """Three nested tissue classes with a given intensity per class (a 'modality'), 20x18x10."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 20), torch.linspace(-1, 1, 18), torch.linspace(-1, 1, 10), indexing="ij"))
    radius = grid.pow(2).sum(0).sqrt() * (1 + 0.1 * torch.rand(1, generator=generator))
    image = torch.full(radius.shape, contrast[0])
    image[radius < 1.0] = contrast[1]
    image[radius < 0.5] = contrast[2]
    image = image + 0.02 * torch.randn(radius.shape, generator=generator)
    return MetaTensor(image[None], affine=torch.from_numpy(oblique_affine()))


@pytest.fixture(scope="module")
def lmi_model(tmp_path_factory):
    torch.manual_seed(0)
    return train_translation([_phantom(0), _phantom(1)], tmp_path_factory.mktemp("lmi"), TranslationConfig.tiny(**TINY))


def test_translation_keeps_the_source_geometry_and_range(lmi_model):
    source = _phantom(5, contrast=(0.9, 0.1, 0.5))  # an unseen, non-monotone contrast
    translated = translate_volume(source, lmi_model, sampler="ddim", steps=5, seed=1)
    assert translated.shape == source.shape
    assert torch.allclose(translated.affine, source.affine)
    assert 0.0 <= float(translated.min()) and float(translated.max()) <= 1.0
    again = translate_volume(source, lmi_model, sampler="ddim", steps=5, seed=1)
    assert torch.equal(translated, again)


def _stored_otherwise(volume: MetaTensor) -> MetaTensor:
    """The same physical volume with its voxel axes stored in the order (K, I, J) and I reversed, as a scanner might
    store a sagittal acquisition; the affine says where every voxel lies, so the anatomy is unchanged."""
    size_i = volume.shape[1]
    index_map = torch.zeros(4, 4, dtype=torch.float64)  # new voxel (k, i', j) -> old voxel (size_i - 1 - i', j, k)
    index_map[0, 1], index_map[0, 3], index_map[1, 2], index_map[2, 0], index_map[3, 3] = -1, size_i - 1, 1, 1, 1
    return MetaTensor(volume.as_tensor().permute(0, 3, 1, 2).flip(2), affine=volume.affine @ index_map)


def test_a_volume_stored_in_another_axis_order_translates_to_the_same_anatomy(lmi_model):
    """The model works on RAS-ordered axes (2.5d slices are axial) whatever the storage order of the source."""
    source = _phantom(5, contrast=(0.9, 0.1, 0.5))
    stored = _stored_otherwise(source)
    assert ras_axes(stored.affine) != ras_axes(source.affine)
    config = TranslationConfig.tiny(**TINY)
    assert torch.equal(to_model_grid(source, config, "a"), to_model_grid(stored, config, "b"))
    translated = translate_volume(source, lmi_model, sampler="ddim", steps=4, seed=1)
    translated_stored = translate_volume(stored, lmi_model, sampler="ddim", steps=4, seed=1)
    assert translated_stored.shape == stored.shape and torch.allclose(translated_stored.affine, stored.affine)
    assert torch.allclose(_stored_otherwise(translated).as_tensor(), translated_stored.as_tensor(), atol=1e-6)


def test_a_model_folder_from_before_the_ras_axes_keeps_the_storage_order(lmi_model, tmp_path):
    """Folders written before ``voxel_axes`` existed were trained on storage-ordered grids: they load with it."""
    import json
    import shutil

    from medgen.translate.model import load_translation_model

    assert load_translation_model(lmi_model, torch.device("cpu"))[0].voxel_axes == "ras"
    old = shutil.copytree(lmi_model, tmp_path / "old")
    document = json.loads((old / "medgen_model.json").read_text())
    del document["config"]["voxel_axes"]
    (old / "medgen_model.json").write_text(json.dumps(document))
    config = load_translation_model(old, torch.device("cpu"))[0]
    assert config.voxel_axes == "storage"
    stored = _stored_otherwise(_phantom(5))
    grid = to_model_grid(stored, config, "stored")
    assert not torch.equal(grid, to_model_grid(stored, TranslationConfig.tiny(**TINY), "stored"))
    translated = translate_volume(stored, old, sampler="ddim", steps=4, seed=1)
    assert translated.shape == stored.shape and torch.allclose(translated.affine, stored.affine)


def test_ddim_eta_sets_the_step_noise(lmi_model):
    source = _phantom(5, contrast=(0.9, 0.1, 0.5))
    deterministic = translate_volume(source, lmi_model, sampler="ddim", steps=5, eta=0.0, seed=1)
    stochastic = translate_volume(source, lmi_model, sampler="ddim", steps=5, seed=1)  # default eta = 1
    assert not torch.equal(deterministic, stochastic)
    with pytest.raises(BadInputError, match="eta"):
        translate_volume(source, lmi_model, sampler="ddim", steps=5, eta=1.5)


def test_ddim_step_counts_must_divide_the_training_timesteps(lmi_model):
    from medgen.diffusion import check_ddim_steps

    for steps in (1, 8, 250, 1000):
        check_ddim_steps(steps, 1000)
    for steps, hint in ((300, "200 or 250"), (700, "500 or 1000"), (0, "1 or 2"), (1001, "500 or 1000")):
        with pytest.raises(BadInputError, match=f"got {steps}, use e.g. {hint}"):
            check_ddim_steps(steps, 1000)
    with pytest.raises(BadInputError, match="starts at t = 999"):
        translate_volume(_phantom(2), lmi_model, sampler="ddim", steps=300)


def test_compat_setting_conditions_on_the_released_lmi():
    from medgen.translate.lmi import lmi_map
    from medgen.translate.model import _lmi

    generator = torch.Generator().manual_seed(0)
    source, moving = torch.rand((1, 1, 8, 8), generator=generator), torch.randn((1, 1, 8, 8), generator=generator)
    compat, clean = TranslationConfig.tiny(**TINY, lmi_compat=True), TranslationConfig.tiny(**TINY)
    assert torch.equal(_lmi(compat, source, moving), lmi_map(source, moving, compat=True)[0])
    assert torch.equal(_lmi(clean, source, moving), lmi_map(source, moving)[0])
    assert (_lmi(compat, source, moving) == 2.0).any()  # quirk Q2 of the released code on a noisy sample


def test_lmi_agreement_is_higher_with_own_source_than_with_noise(lmi_model):
    config = TranslationConfig.tiny(**TINY)
    source = _phantom(5, contrast=(0.9, 0.1, 0.5))
    assert lmi_agreement(config, source, source) > lmi_agreement(config, source, MetaTensor(torch.rand(1, 20, 18, 10), affine=source.affine))


def test_3d_mode_trains_and_translates(tmp_path):
    config = TranslationConfig.tiny(mode="3d", grid=(8, 8, 8), channels=(8, 16), steps=2, batch_size=2)
    model = train_translation([_phantom(0), _phantom(1)], tmp_path, config)
    out = translate_volume(_phantom(3), model, sampler="ddim", steps=2)
    assert out.shape == (1, 20, 18, 10)


def test_a_model_folder_continues_only_with_its_own_volumes_and_settings(tmp_path):
    """A resumed translate-train on other volumes or another LMI definition would mix two models in one folder."""
    config = TranslationConfig.tiny(mode="3d", grid=(8, 8, 8), channels=(8, 16), steps=2, batch_size=2)
    train_translation([_phantom(0), _phantom(1)], tmp_path, config)
    with pytest.raises(BadInputError, match="lmi_compat False -> True"):
        train_translation([_phantom(0), _phantom(1)], tmp_path, dataclasses.replace(config, lmi_compat=True))
    with pytest.raises(BadInputError, match="data"):
        train_translation([_phantom(0)], tmp_path, config)
    with pytest.raises(BadInputError, match="seed 0 -> 5"):
        train_translation([_phantom(0), _phantom(1)], tmp_path, config, seed=5)
    shorter = train_translation([_phantom(0), _phantom(1)], tmp_path, dataclasses.replace(config, steps=1))
    assert read_model_json(shorter, TASK)["config"]["steps"] == 2  # the weights' own training, not the request


def test_a_folder_from_before_the_ras_axes_continues_on_storage_axes(tmp_path):
    """An older MedGen trained on storage-ordered grids and recorded no ``voxel_axes``: such a folder continues only
    with ``voxel_axes="storage"`` (a ``translate-train`` parameter too), not with today's RAS default."""
    config = TranslationConfig.tiny(mode="3d", grid=(8, 8, 8), channels=(8, 16), steps=2, batch_size=2, voxel_axes="storage")
    train_translation([_phantom(0), _phantom(1)], tmp_path, config)
    record = json.loads((tmp_path / RUN_JSON).read_text())
    del record["settings"]["voxel_axes"]  # as the older version wrote it
    (tmp_path / RUN_JSON).write_text(json.dumps(record))
    with pytest.raises(BadInputError, match="voxel_axes 'storage' -> 'ras'"):
        train_translation([_phantom(0), _phantom(1)], tmp_path, dataclasses.replace(config, voxel_axes="ras"))
    continued = train_translation([_phantom(0), _phantom(1)], tmp_path, dataclasses.replace(config, steps=3))
    assert read_model_json(continued, TASK)["config"]["steps"] == 3
    from medgen.jobs.kinds import get_kind
    from medgen.translate.jobs import TRAINING_OVERRIDES

    assert "voxel_axes" in get_kind("translate-train").params["properties"] and "voxel_axes" in TRAINING_OVERRIDES


def test_the_seed_alone_decides_the_weights(tmp_path):
    config = TranslationConfig.tiny(mode="3d", grid=(8, 8, 8), channels=(8, 16), steps=2, batch_size=2)
    weights = {}
    for name, seed, global_seed in (("a", 1, 0), ("b", 1, 42), ("c", 2, 0)):
        torch.manual_seed(global_seed)
        folder = train_translation([_phantom(0), _phantom(1)], tmp_path / name, config, seed=seed)
        weights[name] = load_file(folder / "unet.safetensors")
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert not all(torch.equal(weights["a"][key], weights["c"][key]) for key in weights["a"])


def test_sdedit_baseline_with_an_unconditional_model(tmp_path):
    model = train_translation([_phantom(0)], tmp_path, TranslationConfig.tiny(conditioned=False, **TINY))
    out = translate_volume(_phantom(3), model, sampler="ddim", steps=10, sdedit_start=499)
    assert out.shape == (1, 20, 18, 10)
    with pytest.raises(BadInputError, match="unconditional"):
        translate_volume(_phantom(3), model, sampler="ddim", steps=10)


def test_bad_sources_are_clear_errors(lmi_model, tmp_path):
    affine = torch.from_numpy(oblique_affine())
    with pytest.raises(BadInputError, match="constant"):
        translate_volume(MetaTensor(torch.ones(1, 8, 8, 8), affine=affine), lmi_model, sampler="ddim", steps=2)
    nan = torch.rand(1, 8, 8, 8)
    nan[0, 1, 1, 1] = float("nan")
    with pytest.raises(BadInputError, match="NaN"):
        translate_volume(MetaTensor(nan, affine=affine), lmi_model, sampler="ddim", steps=2)
    (tmp_path / "medgen_model.json").write_text('{"task": "joint-image-label-ldm"}')
    with pytest.raises(ModelError, match="lmi-translation"):
        translate_volume(_phantom(1), tmp_path)


def test_model_folder_with_unusable_settings_is_a_model_error(lmi_model, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(lmi_model, tmp_path / "model")
    document = json.loads((folder / "medgen_model.json").read_text())
    for config, message in ((None, "settings are missing"), ({**document["config"], "future": 1}, "Unknown translation-model settings")):
        (folder / "medgen_model.json").write_text(json.dumps({**document, "config": config}))
        with pytest.raises(ModelError, match=message):
            translate_volume(_phantom(1), folder, sampler="ddim", steps=2)
    # weights of another architecture: a ModelError listing the mismatched shapes, not a RuntimeError
    (folder / "medgen_model.json").write_text(json.dumps({**document, "config": {**document["config"], "channels": [8, 32]}}))
    with pytest.raises(ModelError, match="shape mismatches"):
        translate_volume(_phantom(1), folder, sampler="ddim", steps=2)


@pytest.mark.parametrize("overrides, message", [
    (dict(grid=(9, 9, 9)), r"I and J must be multiples of 2 \(e.g. \(8, 8, 9\)\)"),
    (dict(grid=(16, 16, 9), mode="3d"), r"I, J and K must be multiples of 2"),
    (dict(mode="2d"), "'2.5d' or '3d'"),
])
def test_settings_the_network_cannot_use_are_refused_before_training(overrides, message):
    with pytest.raises(BadInputError, match=message):
        TranslationConfig.tiny(**overrides)


def test_training_volumes_without_anatomy_are_a_clear_error(tmp_path):
    # one bright voxel on a zero background: it scales to 1, but resizing 64² slices to the 16² grid skips it
    sparse = torch.zeros(1, 64, 64, 10)
    sparse[0, 0, 0, 0] = 1000.0
    with pytest.raises(BadInputError, match="Every axial slice of the 1 training volume"):
        train_translation([MetaTensor(sparse, affine=torch.eye(4, dtype=torch.float64))], tmp_path, TranslationConfig.tiny(**TINY))
    constant = MetaTensor(torch.ones(1, 8, 8, 8), affine=torch.eye(4, dtype=torch.float64), meta={"filename_or_obj": "/data/flat_t1.nii.gz"})
    with pytest.raises(BadInputError, match="flat_t1.nii.gz is constant"):
        train_translation([constant], tmp_path, TranslationConfig.tiny(**TINY))


def test_translation_jobs_through_the_worker(tmp_path):
    from medgen.io import load_volume, save_volume
    from medgen.jobs.exit_codes import ExitCode
    from medgen.slicer.runner import run_job_blocking, write_job

    volumes = [str(save_volume(_phantom(seed), tmp_path / f"t{seed}.nii.gz")) for seed in range(2)]
    source = save_volume(_phantom(7, contrast=(0.9, 0.1, 0.5)), tmp_path / "source.nii.gz")
    train = run_job_blocking(write_job(tmp_path / "jobs", "translate-train", {"volumes": volumes},
                                       {"grid": list(TINY["grid"]), "steps": 3, "memory_budget_mb": 300}), timeout_s=600)
    assert train.returncode == ExitCode.OK, train.error
    # the LMI budget its out-of-memory advice names can be set for training too
    assert read_model_json(train.result["outputs"]["model"], TASK)["config"]["memory_budget_mb"] == 300
    job = run_job_blocking(write_job(tmp_path / "jobs", "translate", {"source": str(source), "model": train.result["outputs"]["model"]},
                                     {"sampler": "ddim", "steps": 4}), timeout_s=600)
    assert job.returncode == ExitCode.OK, job.error
    translated = load_volume(job.result["outputs"]["translated"])
    assert translated.shape == (1, 20, 18, 10) and torch.allclose(translated.affine, load_volume(source).affine, atol=1e-5)


def test_training_conditions_on_the_next_timestep_with_the_same_noise(tmp_path, monkeypatch):
    """Spec A.4: the training condition is LMI(x0, x_{t+1}) with x_{t+1} noised by the same noise as x_t (t + 1
    clamped to T - 1), and the network sees [x_t, LMI(x0, x_{t+1}), LMI(x0, x0)] in that order."""
    import medgen.translate.model as translation

    noised, inputs = [], []
    build_scheduler, build_unet = translation.build_scheduler, translation.build_unet

    def recording_scheduler(config):
        scheduler = build_scheduler(config)
        add_noise = scheduler.add_noise
        scheduler.add_noise = lambda x0, noise, t: noised.append((x0, noise, t)) or add_noise(x0, noise, t)
        return scheduler

    def recording_unet(config):
        unet = build_unet(config)
        unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
        return unet

    monkeypatch.setattr(translation, "build_scheduler", recording_scheduler)
    monkeypatch.setattr(translation, "build_unet", recording_unet)
    config = TranslationConfig.tiny(**{**TINY, "steps": 1})
    train_translation([_phantom(0)], tmp_path, config)
    (x0, noise, t), (x0_next, noise_next, t_next) = noised[:2]
    assert x0_next is x0 and torch.equal(noise_next, noise)
    assert torch.equal(t_next, (t + 1).clamp(max=config.num_train_timesteps - 1))
    (network_input,) = inputs
    x_t, x_next = (translation.build_scheduler(config).add_noise(x0, noise, step) for step in (t, t_next))
    assert torch.equal(network_input[:, :1], x_t)
    torch.testing.assert_close(network_input[:, 1:2], translation._lmi(config, x0, x_next))
    torch.testing.assert_close(network_input[:, 2:3], translation._lmi(config, x0, x0))


def test_sampling_feeds_the_condition_in_the_training_order_within_the_memory_budget(lmi_model, monkeypatch):
    """Spec A.5: every step recomputes LMI(source, x_t) and feeds [x_t, LMI(S, x_t), LMI(S, S)] as in training; a
    memory budget given for the run reaches every LMI map (the out-of-memory advice relies on it)."""
    import medgen.translate.model as translation

    inputs, budgets = [], []
    load_model, lmi_map = translation.load_translation_model, translation.lmi_map

    def recording_model(model_dir, device):
        config, unet = load_model(model_dir, device)
        unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
        return config, unet

    def recording_lmi_map(*args, **kwargs):
        budgets.append(kwargs["memory_budget_mb"])
        return lmi_map(*args, **kwargs)

    monkeypatch.setattr(translation, "load_translation_model", recording_model)
    monkeypatch.setattr(translation, "lmi_map", recording_lmi_map)
    source = _phantom(3, contrast=(0.9, 0.1, 0.5))
    translate_volume(source, lmi_model, sampler="ddim", steps=2, memory_budget_mb=64)
    assert len(inputs) == 2 and budgets and set(budgets) == {64.0}
    config = dataclasses.replace(translation.load_translation_model(lmi_model, torch.device("cpu"))[0], memory_budget_mb=64.0)
    source_grid = to_model_grid(source, config, "source")
    self_lmi = translation._lmi(config, source_grid, source_grid)
    for network_input in inputs:
        torch.testing.assert_close(network_input[:, 1:2], translation._lmi(config, source_grid, network_input[:, :1]))
        torch.testing.assert_close(network_input[:, 2:3], self_lmi)


def test_samplers_run_down_to_a_clean_sample(lmi_model, monkeypatch):
    """The released DDPM: all T steps, the last at t = 0 (stopping at t = 1 would return a noisy x_1); DDIM likewise."""
    import medgen.translate.model as translation

    seen = {}

    def recording_sample(denoise, scheduler, noise, *, timesteps, **kwargs):
        seen.update(timesteps=list(timesteps), scheduler=scheduler)
        return noise

    monkeypatch.setattr(translation, "sample", recording_sample)
    translate_volume(_phantom(3), lmi_model, sampler="ddpm")
    assert seen["timesteps"] == list(range(999, -1, -1))
    # DDIM: 10 strided steps ending at 99, whose step lands on alpha-bar 1 (a clean x0, not the noise of t = 99)
    translate_volume(_phantom(3), lmi_model, sampler="ddim", steps=10)
    assert seen["timesteps"] == list(range(999, 0, -100)) and float(seen["scheduler"].final_alpha_cumprod) == 1.0


def test_the_model_folder_holds_the_ema_weights(lmi_model):
    """The shipped weights are the exponential moving average of training (spec A.8), not the last raw step."""
    from medgen.diffusion.checkpoint import load_trained_weights
    from medgen.translate.model import build_unet

    config = TranslationConfig.tiny(**TINY)
    shipped = load_file(lmi_model / "unet.safetensors")
    averaged = load_trained_weights(build_unet(config), lmi_model / "checkpoints", use_ema=True).state_dict()
    raw = load_trained_weights(build_unet(config), lmi_model / "checkpoints", use_ema=False).state_dict()
    assert all(torch.equal(shipped[name], averaged[name]) for name in shipped)
    assert not all(torch.equal(shipped[name], raw[name]) for name in shipped)
