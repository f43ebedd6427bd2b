"""Translation behaviour that no other test pinned down (found by mutation testing)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from monai.data import MetaTensor

from medgen.translate import jobs
from medgen.translate.model import TranslationConfig, from_model_grid, to_model_grid


def _volume(shape, affine=None) -> MetaTensor:
    """Asymmetric texture with 10 % of the voxels at 0 and 10 % at 1, so that the 0.5-99.5 percentile scaling is the
    identity and a round trip must give the voxels back."""
    generator = torch.Generator().manual_seed(0)
    data = torch.rand(shape, generator=generator)
    draw = torch.rand(shape, generator=generator)
    data[draw < 0.1], data[draw > 0.9] = 0.0, 1.0
    data += torch.linspace(0, 0.3, shape[1]).view(-1, 1, 1) * (data > 0) * (data < 1)  # a gradient along I
    return MetaTensor(data.clamp(0, 1)[None], affine=torch.eye(4, dtype=torch.float64) if affine is None else affine)


def _axis_swapping_affine() -> torch.Tensor:
    """Voxel axes stored as (S, R, A) with A reversed: neither a plain permutation nor its own inverse."""
    affine = torch.zeros(4, 4, dtype=torch.float64)
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 1.0, 1.0, -1.0, 1.0
    return affine


@pytest.mark.parametrize("mode", ["2.5d", "3d"])
@pytest.mark.parametrize("storage", ["ras", "swapped"])
def test_the_model_grid_round_trip_gives_the_volume_back(mode, storage):
    """to_model_grid then from_model_grid on a grid of the volume's own size is the identity: every voxel returns to
    its place (2.5d slices are not transposed, RAS reordering is undone), geometry kept."""
    affine = None if storage == "ras" else _axis_swapping_affine()
    volume = _volume((16, 16, 16), affine)
    config = TranslationConfig.tiny(mode=mode, grid=(16, 16, 16), channels=(8, 16))
    grid = to_model_grid(volume, config, "volume")
    back = from_model_grid(grid, volume, config)
    assert torch.equal(back.affine, volume.affine)
    torch.testing.assert_close(back.as_tensor(), volume.as_tensor(), atol=1e-6, rtol=0)


def test_a_bright_outlier_does_not_squash_the_scaling():
    """Volumes are scaled by their 0.5-99.5 percentiles: one hot voxel (a metal artefact) must not compress the
    anatomy into the bottom of [0, 1]."""
    volume = _volume((16, 16, 16))
    volume[0, 3, 3, 3] = 1000.0
    grid = to_model_grid(volume, TranslationConfig.tiny(mode="3d", grid=(16, 16, 16), channels=(8, 16)), "volume")
    assert float(torch.quantile(grid.flatten(), 0.95)) > 0.9


def _context(tmp_path, inputs, params, seed=7):
    return SimpleNamespace(inputs=inputs, params=params, output_path=lambda name: tmp_path / name,
                           device=torch.device("cpu"), reporter=None, spec=SimpleNamespace(seed=seed))


@pytest.mark.parametrize("preset", ["tiny", "midiffusion"])
def test_every_translate_train_parameter_reaches_the_training(monkeypatch, tmp_path, preset):
    seen = {}
    monkeypatch.setattr(jobs, "load_volume", lambda path, name=None: path)
    monkeypatch.setattr(jobs, "train_translation",
                        lambda volumes, out, config, **kwargs: seen.update(volumes=volumes, config=config, **kwargs) or out)
    params = {"preset": preset, "grid": [16, 16, 8], "conditioned": False, "mode": "3d", "lmi_compat": True, "steps": 3,
              "batch_size": 2, "lr": 0.01, "voxel_axes": "storage", "memory_budget_mb": 300.0, "target_modality": "T1"}
    jobs.run_translate_train(_context(tmp_path, {"volumes": ["a.nii.gz", "b.nii.gz"]}, params))
    config = seen["config"]
    assert seen["volumes"] == ["a.nii.gz", "b.nii.gz"] and seen["seed"] == 7 and seen["target_modality"] == "T1"
    for name in ("conditioned", "mode", "lmi_compat", "steps", "batch_size", "lr", "voxel_axes", "memory_budget_mb"):
        assert getattr(config, name) == params[name], name
    assert config.grid == (16, 16, 8)
    base = TranslationConfig.tiny() if preset == "tiny" else TranslationConfig()
    assert config.channels == base.channels and config.ema_decay == base.ema_decay  # the preset's network and EMA


def test_every_translate_parameter_reaches_the_translation(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(jobs, "load_volume", lambda path, name=None: path)
    monkeypatch.setattr(jobs, "translate_volume", lambda source, model, **kwargs: seen.update(source=source, model=model, **kwargs))
    monkeypatch.setattr(jobs, "save_volume", lambda volume, path: path)
    params = {"sampler": "ddim", "steps": 50, "sdedit_start": 499, "eta": 0.25, "memory_budget_mb": 128.0}
    jobs.run_translate(_context(tmp_path, {"source": "s.nii.gz", "model": "/models/t1"}, params, seed=3))
    assert seen == {"source": "s.nii.gz", "model": "/models/t1", "sampler": "ddim", "steps": 50, "sdedit_start": 499,
                    "eta": 0.25, "seed": 3, "device": torch.device("cpu"), "reporter": None, "memory_budget_mb": 128.0}


def _peak_allocated_bytes(function) -> int:
    """Peak of the bytes PyTorch's CPU allocator holds while ``function`` runs (profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    results = getattr(profile.profiler, "kineto_results", None)
    if results is None:
        pytest.skip("this torch build's profiler does not expose its memory events")
    level = peak = 0
    for event in sorted((e for e in results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def test_the_gather_scorers_budget_holds_when_the_chunk_dominates():
    """The memory budget bounds what the LMI map allocates also where the chunk, not the fixed part, takes most of
    it (on a GPU an underestimate is an out-of-memory error). An 80 MiB budget for a 16³ compat map: the chunk's share
    (≈ 46 of the 48 MiB left beside the 32 MiB workspace) dwarfs the fixed part (≈ 2 MB)."""
    from medgen.translate.lmi import lmi_map
    from medgen.translate.lmi_core import WORKSPACE_BYTES

    generator = torch.Generator().manual_seed(0)
    source = torch.rand((1, 1, 16, 16, 16), generator=generator)
    moving = 0.7 * source + 0.3 * torch.randn(source.shape, generator=generator)
    budget_mb = 80
    peak = _peak_allocated_bytes(lambda: lmi_map(source, moving, compat=True, memory_budget_mb=budget_mb))
    assert peak <= budget_mb * 2**20 - WORKSPACE_BYTES


def test_a_budget_holding_one_whole_item_scores_it_in_one_chunk():
    """Box sums take as many whole items as fit, one included, before they fall back to slabs of planes."""
    from medgen.translate.lmi_box import box_chunk_voxels, box_fixed_bytes, box_slab_bytes
    from medgen.translate.lmi_core import LmiSettings

    settings, spatial = LmiSettings(), (6, 5, 4)
    for batch in (1, 3):
        one_item_mb = (box_fixed_bytes(batch, spatial) + box_slab_bytes(1, spatial[0], spatial, settings)) / 2**20
        assert box_chunk_voxels(batch, spatial, settings, one_item_mb + 1e-6) == 6 * 5 * 4
