"""Oracles of spec ``diffusion_methods.md`` A.9 (1-8) for the LMI operator, plus the contract.

Numbers in comments are the spec's probes (2D repo code) or this operator's 3D values.
"""

from __future__ import annotations

import pytest
import torch

from medgen.errors import BadInputError, CancelledError, OutOfMemoryError
from medgen.progress import CallbackReporter
from medgen.translate.lmi import (
    _axis_sample_coordinates,
    bytes_per_chunk_voxel,
    chunk_voxels_for_budget,
    fixed_bytes,
    lmi_map,
)
from medgen.translate.lmi_core import LmiSettings
from medgen.translate.lmi_reference import lmi_map_reference


def _noise(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """I.i.d. uniform [0,1] texture: the phantom the oracles need (flat phantoms give LMI ≈ 0)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _shuffled(volume: torch.Tensor, seed: int = 1) -> torch.Tensor:
    order = torch.randperm(volume.numel(), generator=torch.Generator().manual_seed(seed))
    return volume.reshape(-1)[order].reshape(volume.shape)


def _interior(volume: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """Drop ``margin`` voxels at every spatial border of ``(B, C, *spatial)``."""
    return volume[(slice(None), slice(None)) + (slice(margin, -margin),) * (volume.dim() - 2)]


NOISE_3D = (1, 1, 12, 12, 12)
NOISE_2D = (1, 1, 32, 32)


def _stress_windows_2d() -> torch.Tensor:
    """Constant, binary, two-level, sparse and uniform regions side by side in one 2D image."""
    generator = torch.Generator().manual_seed(3)
    regions = [
        torch.full((12, 12), 0.4),
        (torch.rand(12, 12, generator=generator) > 0.5).float(),
        torch.where(torch.rand(12, 12, generator=generator) > 0.5, 0.3, 0.7),
        (torch.rand(12, 12, generator=generator) > 0.9).float() * 0.8,
        torch.rand(12, 12, generator=generator),
    ]
    return torch.cat(regions, dim=1)[None, None]


@pytest.mark.parametrize("shape", [NOISE_2D, NOISE_3D], ids=["2d", "3d"])
@pytest.mark.parametrize("compat", [False, True], ids=["clean", "compat"])
def test_oracle1_output_shapes_and_nmi_range(shape, compat):
    source = _noise(shape, seed=0)
    moving = _noise(shape, seed=1)
    lmi, offsets = lmi_map(source, moving, compat=compat)
    assert lmi.shape == source.shape and lmi.dtype == torch.float32
    assert offsets.shape == (shape[0], len(shape) - 2, *shape[2:]) and offsets.dtype == torch.int64
    assert offsets.abs().max() <= 1
    assert lmi.min() >= -0.1 and lmi.max() <= 1.0

    stress = _stress_windows_2d()
    stress_lmi, _ = lmi_map(stress, stress.flip(-1), compat=compat)
    assert stress_lmi.min() >= -0.1 and stress_lmi.max() <= 1.0


def test_oracle2_self_exceeds_shuffled():
    volume = _noise(NOISE_3D)
    self_lmi, _ = lmi_map(volume, volume)
    shuffled_lmi, _ = lmi_map(volume, _shuffled(volume))
    # spec 3D clean: 0.531 vs 0.328
    assert self_lmi.mean() - shuffled_lmi.mean() > 0.05


def test_oracle3_intensity_inversion_invariance():
    volume = _noise(NOISE_3D)
    self_mean = lmi_map(volume, volume)[0].mean()
    inverted_mean = lmi_map(volume, 1.0 - volume)[0].mean()
    squared_mean = lmi_map(volume, volume**2)[0].mean()
    shuffled_mean = lmi_map(volume, _shuffled(volume))[0].mean()
    assert abs(inverted_mean - self_mean) < 0.02
    assert squared_mean >= shuffled_mean

    image = _noise(NOISE_2D)
    self_2d = lmi_map(image, image, compat=True)[0].mean()
    inverted_2d = lmi_map(image, 1.0 - image, compat=True)[0].mean()
    assert abs(inverted_2d - self_2d) < 0.01  # spec 2D: 0.0008


def test_oracle4_approximate_symmetry():
    first, second = _noise(NOISE_3D, seed=4), _noise(NOISE_3D, seed=5)
    forward = lmi_map(first, second)[0].mean()
    backward = lmi_map(second, first)[0].mean()
    assert abs(forward - backward) < 0.01


@pytest.mark.parametrize("compat", [False, True], ids=["clean", "compat"])
def test_oracle5_flat_regions(compat):
    constant = torch.full((1, 1, 8, 8, 8), 0.6)
    lmi, offsets = lmi_map(constant, constant, compat=compat)
    assert torch.isfinite(lmi).all()
    assert _interior(lmi, 1).max() < 1e-3  # spec 3D clean: 6e-9
    if not compat:
        assert lmi.max() < 1e-3  # replicate padding: the border of a constant volume is flat too
        assert (_interior(offsets) == 0).all()  # clean ties go to δ = 0
    else:
        assert lmi.max() > 0.1  # the released zero padding makes an edge at the border


@pytest.mark.parametrize("shape", [(2, 1, 9, 7), (1, 1, 6, 5, 7)], ids=["2d", "3d"])
def test_clean_mode_replicates_the_border(shape):
    """Clean windows beyond the border read the nearest edge voxel: the map equals the interior of the
    map of the inputs replicate-padded by window//2 + radius (whose windows never leave the padded volume)."""
    source, moving = _noise(shape, seed=3), _noise(shape, seed=4)
    lmi, offsets = lmi_map(source, moving)
    margin = 2
    pad = lambda volume: torch.nn.functional.pad(volume, (margin,) * (2 * (len(shape) - 2)), mode="replicate")  # noqa: E731
    padded_lmi, padded_offsets = lmi_map(pad(source), pad(moving))
    assert torch.allclose(lmi, _interior(padded_lmi, margin), atol=1e-6)
    assert (offsets == _interior(padded_offsets, margin)).float().mean() > 0.99  # only near-ties may differ


def test_clean_border_is_modality_invariant():
    """A bright-background and a dark-background rendering of one textured layout give the same border LMI
    in clean mode (zero padding would add an edge only where the background is bright)."""
    labels = (torch.arange(12).view(1, 1, 12, 1) // 4 + torch.arange(12).view(1, 1, 1, 12) // 6) % 3
    texture = 0.02 * _noise((1, 1, 12, 12), seed=5)
    dark, bright = torch.tensor([0.05, 0.5, 0.95]), torch.tensor([0.5, 0.95, 0.05])
    dark_lmi = lmi_map(dark[labels] + texture, dark[labels] + texture)[0]
    bright_lmi = lmi_map(bright[labels] + texture, bright[labels] + texture)[0]
    assert (dark_lmi - bright_lmi).abs().mean() < 0.02
    compat_dark = lmi_map(dark[labels] + texture, dark[labels] + texture, compat=True)[0]
    compat_bright = lmi_map(bright[labels] + texture, bright[labels] + texture, compat=True)[0]
    assert (compat_dark - compat_bright).abs().mean() > 2 * (dark_lmi - bright_lmi).abs().mean()


def test_oracle6_identical_windows_do_not_give_one():
    volume = _noise(NOISE_3D)
    lmi, _ = lmi_map(volume, volume)
    # the kernel width (8 grey levels) is close to the bin spacing (9.8), so NMI stays near 0.5
    assert 0.4 < lmi.mean() < 0.65
    assert lmi.max() < 0.7  # spec 3D: maximum ≈ 0.58
    image = _noise(NOISE_2D)
    lmi_2d, _ = lmi_map(image, image, compat=True)
    assert 0.45 < lmi_2d.mean() < 0.6  # spec 2D: 0.52, maximum 0.60
    assert lmi_2d.max() < 0.65


@pytest.mark.parametrize("shift", [(1, 0, 0), (0, -1, 0), (1, 1, -1)], ids=["axial0", "axial1", "diagonal"])
def test_oracle7_shift_recovery(shift):
    source = _noise(NOISE_3D)
    moving = torch.roll(source, shifts=shift, dims=(2, 3, 4))
    _, offsets = lmi_map(source, moving)
    expected = torch.tensor(shift).view(1, 3, 1, 1, 1)
    recovered = (_interior(offsets) == expected).all(dim=1).float().mean()
    assert recovered >= 0.98  # spec 3D clean: 100%


def test_oracle7_shift_recovery_fails_in_compat_mode():
    """Quirk Q1: the released candidate windows do not re-align shifted images (spec 2D: ~37% axial, ~1% diagonal)."""
    source = _noise(NOISE_2D)
    for shift, ceiling in (((1, 0), 0.6), ((1, 1), 0.1)):
        moving = torch.roll(source, shifts=shift, dims=(2, 3))
        _, offsets = lmi_map(source, moving, compat=True)
        recovered = (_interior(offsets) == torch.tensor(shift).view(1, 2, 1, 1)).all(dim=1).float().mean()
        assert recovered < ceiling


def test_oracle8_out_of_range_guard():
    source = _noise(NOISE_2D)
    pure_noise = torch.randn(NOISE_2D, generator=torch.Generator().manual_seed(8))
    clean_lmi, _ = lmi_map(source, pure_noise)
    assert clean_lmi.max() <= 1.0
    compat_lmi, _ = lmi_map(source, pure_noise, compat=True)
    fraction_two = (compat_lmi == 2.0).float().mean()
    assert fraction_two > 0.05  # spec 2D: 19% of pixels of LMI(src, x_T) equal 2.0


@pytest.mark.parametrize(
    "shape, compat, normalize, moving_kind",
    [
        ((2, 1, 14, 11), False, True, "noise"),
        ((2, 1, 14, 11), True, True, "noise"),
        ((1, 1, 16, 16), True, True, "out_of_range"),
        ((1, 1, 16, 16), False, False, "out_of_range"),
        ((1, 1, 7, 6, 5), False, True, "shifted"),
        ((1, 1, 7, 6, 5), True, True, "shifted"),
        ((1, 1, 7, 6, 5), True, False, "out_of_range"),
    ],
)
def test_fast_operator_matches_unfold_port(shape, compat, normalize, moving_kind):
    source = _noise(shape, seed=10)
    moving = {
        "noise": _noise(shape, seed=11),
        "out_of_range": torch.randn(shape, generator=torch.Generator().manual_seed(12)) * 0.5 + 0.5,
        "shifted": torch.roll(source, shifts=1, dims=2) ** 2,
    }[moving_kind]
    fast_lmi, fast_offsets = lmi_map(source, moving, compat=compat, normalize=normalize, memory_budget_mb=33.5)
    port_lmi, port_offsets = lmi_map_reference(source, moving, compat=compat, normalize=normalize)
    assert (fast_lmi - port_lmi).abs().max() < 2e-5
    # float32 summation order differs, so only near-ties (< 1e-5 apart) may pick another candidate
    disagree = (fast_offsets != port_offsets).any(dim=1).float().mean()
    assert disagree <= 0.01


def test_compat_windows_reproduce_quirk_q1_rows():
    """Released candidate windows on a displaced axis sample [u, u+d, u] instead of [u+d-1, u+d, u+d+1]."""
    table = _axis_sample_coordinates(8, LmiSettings(compat=True), True, torch.device("cpu"))
    assert table[2, :, 4].tolist() == [4, 5, 4]  # δ=+1 at u=4
    assert table[0, :, 4].tolist() == [4, 3, 4]  # δ=-1 at u=4
    assert table[1, :, 4].tolist() == [3, 4, 5]  # δ=0 is the plain window
    assert table[0, :, 0].tolist() == [8, 8, 0]  # at the border the repeated centre is padding (index 8)
    clean_table = _axis_sample_coordinates(8, LmiSettings(), True, torch.device("cpu"))
    assert clean_table[2, :, 4].tolist() == [4, 5, 6]  # clean: the true window centred at u+1
    assert clean_table[0, :, 0].tolist() == [0, 0, 0]  # clean: beyond the border, the edge voxel
    assert clean_table[2, :, 7].tolist() == [7, 7, 7]


@pytest.mark.parametrize(
    "source, moving",
    [
        (torch.rand(16, 16), torch.rand(16, 16)),
        (torch.rand(1, 2, 8, 8), torch.rand(1, 2, 8, 8)),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 9)),
        (torch.rand(1, 1, 4, 4, 4, 4), torch.rand(1, 1, 4, 4, 4, 4)),
        (torch.full((1, 1, 8, 8), float("nan")), torch.rand(1, 1, 8, 8)),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8).index_fill(2, torch.tensor([3]), float("nan"))),
        ([[0.0]], torch.rand(1, 1, 8, 8)),
    ],
    ids=["no_batch_axes", "two_channels", "mismatched", "4d_spatial", "nan_source", "nan_moving", "not_tensor"],
)
def test_bad_input_raises_bad_input_error(source, moving):
    with pytest.raises(BadInputError):
        lmi_map(source, moving)
    with pytest.raises(BadInputError):
        lmi_map_reference(source, moving)


@pytest.mark.parametrize(
    "settings",
    [
        dict(window=2),
        dict(radius=-1),
        dict(bins=1),
        dict(sigma=0.0),
        dict(compat=True, radius=2),
        dict(compat=True, bins=30),
        dict(memory_budget_mb=float("inf")),
        dict(memory_budget_mb=float("nan")),
        dict(memory_budget_mb="512"),
    ],
)
def test_bad_settings_raise_bad_input_error(settings):
    with pytest.raises(BadInputError):
        lmi_map(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), **settings)


def test_memory_budget_bounds_chunks_and_keeps_results():
    """The gather scorer's chunks (compat mode; clean mode's box sums: ``test_lmi_box.py``)."""
    shape = (8, 8, 8)
    source, moving = _noise((1, 1, *shape), seed=20), _noise((1, 1, *shape), seed=21)
    settings = LmiSettings(compat=True)
    budget_mb = 34.0  # the fixed part (32 MiB workspace + fields) plus room for ~130 voxels
    chunk = chunk_voxels_for_budget(1, shape, settings, budget_mb)
    assert fixed_bytes(1, shape, settings) + chunk * bytes_per_chunk_voxel(3, settings) <= budget_mb * 2**20
    events = []
    small_lmi, small_offsets = lmi_map(
        source, moving, compat=True, memory_budget_mb=budget_mb, reporter=CallbackReporter(on_event=events.append)
    )
    large_lmi, large_offsets = lmi_map(source, moving, compat=True, memory_budget_mb=512)
    assert len(events) == -(-(8**3) // chunk) > 1
    assert events[-1]["step"] == events[-1]["total"]
    assert (small_lmi - large_lmi).abs().max() < 1e-6
    assert torch.equal(small_offsets, large_offsets)
    with pytest.raises(BadInputError):
        lmi_map(source, moving, memory_budget_mb=0.1)


@pytest.mark.parametrize("compat", [False, True])
def test_inputs_that_require_grad_give_the_same_map_without_a_graph(compat):
    source, moving = _noise((1, 1, 6, 6, 6), seed=3), _noise((1, 1, 6, 6, 6), seed=4)
    expected = lmi_map(source, moving, compat=compat)
    lmi, offsets = lmi_map(source.requires_grad_(), moving.requires_grad_(), compat=compat)
    assert not lmi.requires_grad and torch.equal(lmi, expected[0]) and torch.equal(offsets, expected[1])


def test_host_memory_running_out_names_the_budget(monkeypatch):
    import medgen.translate.lmi as lmi_module

    def exhausted(*args, **kwargs):  # what PyTorch's CPU allocator raises
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(lmi_module, "pick_best_candidate", exhausted)
    volume = _noise((1, 1, 6, 6, 6))
    with pytest.raises(OutOfMemoryError, match="lower memory_budget_mb"):
        lmi_map(volume, volume)


def test_cancel_between_chunks_raises_cancelled_error():
    volume = _noise((1, 1, 6, 6, 6))
    with pytest.raises(CancelledError):
        lmi_map(volume, volume, reporter=CallbackReporter(should_stop=lambda: True))


def test_the_map_is_float32_inside_a_bfloat16_autocast():
    """Training computes the condition inside the trainer's autocast; it must equal the map sampling computes."""
    generator = torch.Generator().manual_seed(0)
    source, moving = torch.rand((1, 1, 6, 6), generator=generator), torch.randn((1, 1, 6, 6), generator=generator)
    plain = lmi_map(source, moving, compat=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = lmi_map(source, moving, compat=True, backend="torch")
    assert autocast[0].dtype == torch.float32
    assert torch.equal(plain[0], autocast[0]) and torch.equal(plain[1], autocast[1])


@pytest.mark.parametrize("flushing", [False, True])
def test_the_callers_denormal_mode_is_kept(flushing):
    """The CPU map flushes denormals while it runs (speed) and leaves the caller's mode as it found it, on or off."""
    from medgen.translate.lmi import _flushing_denormals

    torch.set_flush_denormal(flushing)
    try:
        lmi_map(torch.rand(1, 1, 6, 6), torch.rand(1, 1, 6, 6))
        assert _flushing_denormals() is flushing
        assert (float(torch.tensor([1e-39]) * 1.0) == 0.0) is flushing
    finally:
        torch.set_flush_denormal(False)


def test_compat_quantises_like_the_released_integer_cast():
    """Compat kernel units are the released ``(x * 255).int()``: truncation toward zero (not rounding), unclamped
    (quirk Q2 keeps out-of-range values)."""
    from medgen.translate.lmi_core import to_kernel_units

    values = torch.tensor([0.003, 0.5 / 255 + 0.0019, 0.9999, -0.01, 1.2])
    units = to_kernel_units(values, LmiSettings(compat=True))
    assert units.tolist() == (values * 255).int().float().tolist() == [0.0, 0.0, 254.0, -2.0, 306.0]
