"""The clean-mode box-sum scorer of the LMI operator against the gather scorer and the unfold port,
its chunks (slabs of planes, whole items) and its memory budget."""

from __future__ import annotations

import math

import pytest
import torch

from medgen.progress import CallbackReporter
from medgen.translate import lmi
from medgen.translate.lmi import _axis_sample_coordinates, _TorchScorer, chunk_voxels_for_budget, lmi_map
from medgen.translate.lmi_box import BoxSumScorer, _plane_boxes, box_chunk_voxels, box_fixed_bytes, box_slab_bytes
from medgen.translate.lmi_core import WORKSPACE_BYTES, LmiSettings
from medgen.translate.lmi_reference import lmi_map_reference


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A noise source and a diffusion-like moving image (the source plus noise, partly outside [0, 1])."""
    generator = torch.Generator().manual_seed(seed)
    source = torch.rand(shape, generator=generator)
    return source, 0.7 * source + 0.3 * torch.randn(shape, generator=generator)


def _budget_mb(batch: int, spatial: tuple[int, ...], settings: LmiSettings, items: int, planes: int) -> float:
    """The smallest budget whose box-sum chunk holds ``planes`` planes of ``items`` items."""
    return (box_fixed_bytes(batch, spatial) + box_slab_bytes(items, planes, spatial, settings)) / 2**20 + 1e-9


def _peak_allocated_bytes(function) -> int:
    """Peak of the bytes PyTorch's allocator holds while ``function`` runs (profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        function()
    results = getattr(profile.profiler, "kineto_results", None)
    if results is None:  # a private profiler attribute (torch 2.13 has it); the formula check above still ran
        pytest.skip("this torch build's profiler does not expose its memory events")
    events = [event for event in results.events() if event.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def _candidate_index(offsets: torch.Tensor, radius: int) -> torch.Tensor:
    """Candidate index (raster order of ``candidate_displacements``) of offsets ``(B, ndim, *L)``, ``(B·∏L,)``."""
    steps = 2 * radius + 1
    digits = offsets.movedim(1, -1).reshape(-1, offsets.shape[1]) + radius
    return (digits * steps ** torch.arange(offsets.shape[1] - 1, -1, -1)).sum(dim=1)


CASES = [  # shape, window, radius, normalize
    ((1, 1, 9, 7), 3, 1, True),
    ((3, 1, 5, 6), 3, 1, False),
    ((2, 1, 1, 5), 3, 1, True),  # one voxel along the slab axis
    ((1, 1, 6, 2), 5, 2, True),  # window and search wider than the last axis
    ((2, 1, 7, 4), 1, 0, True),
    ((1, 1, 6, 5, 7), 3, 1, True),
    ((2, 1, 2, 1, 6), 3, 2, False),
    ((1, 1, 3, 4, 2), 5, 1, True),
    ((2, 1, 4, 3, 3), 1, 1, False),
    ((1, 1, 5, 4, 3), 3, 0, True),
]


@pytest.mark.parametrize("shape, window, radius, normalize", CASES)
def test_box_sums_match_gathers_and_the_unfold_port(shape, window, radius, normalize):
    source, moving = _pair(shape, seed=sum(shape) + window)
    settings = LmiSettings(window=window, radius=radius, normalize=normalize)
    spatial = shape[2:]
    voxel = torch.arange(math.prod(shape[:1] + spatial))
    tables = [
        [_axis_sample_coordinates(n, settings, displaced, voxel.device) for n in spatial] for displaced in (False, True)
    ]
    gathered = _TorchScorer(source, moving, spatial, *tables, settings)(voxel)
    boxed = BoxSumScorer(source, moving, settings)(voxel)
    # every candidate's score, in the order of candidate_displacements, to float32 rounding
    assert boxed.shape == gathered.shape
    assert (boxed - gathered).abs().max() < 1e-5

    options = dict(window=window, radius=radius, normalize=normalize)
    box_lmi, box_offsets = lmi_map(source, moving, **options)
    port_lmi, port_offsets = lmi_map_reference(source, moving, **options)
    assert (box_lmi - port_lmi).abs().max() < 2e-5
    # the chosen displacement scores the best up to rounding; float32 summation order differs, so only
    # near-ties (window 1: MI ≈ 0 everywhere; an axis of one voxel: equal windows) may pick another one
    chosen = _candidate_index(box_offsets, radius)
    assert (gathered.amax(dim=1) - gathered.gather(1, chosen[:, None])[:, 0]).max() < 1e-5
    top_two = gathered.topk(min(2, gathered.shape[1]), dim=1).values
    decisive = top_two[:, 0] - top_two[:, -1] > 1e-4
    assert torch.equal(chosen[decisive], _candidate_index(port_offsets, radius)[decisive])


def _recording(name: str, scorer_class: type, used: list[str]):
    def construct(*args):
        used.append(name)
        return scorer_class(*args)

    return construct


def test_clean_mode_scores_with_box_sums_and_compat_mode_with_gathers(monkeypatch):
    used = []
    for name in ("BoxSumScorer", "_TorchScorer"):
        monkeypatch.setattr(lmi, name, _recording(name, getattr(lmi, name), used))
    source, moving = _pair((1, 1, 6, 5, 4))
    lmi_map(source, moving, backend="torch")
    lmi_map(source, moving, backend="torch", compat=True)
    assert used == ["BoxSumScorer", "_TorchScorer"]


def test_plane_boxes_split_runs_into_whole_items_and_partial_items():
    # planes 3..10 of items with 4 planes: the end of item 0, all of item 1, the start of item 2
    assert _plane_boxes(3, 11, 4) == [
        (slice(0, 1), slice(3, 4)),
        (slice(1, 2), slice(0, 4)),
        (slice(2, 3), slice(0, 3)),
    ]
    assert _plane_boxes(0, 8, 4) == [(slice(0, 2), slice(0, 4))]
    assert _plane_boxes(5, 7, 4) == [(slice(1, 2), slice(1, 3))]


@pytest.mark.parametrize(
    "shape, items, planes, chunks",
    [
        ((2, 1, 5, 4, 6), 1, 2, 5),  # 2-plane slabs, one straddling the two items
        ((1, 1, 7, 6), 1, 1, 7),  # one row of a 2D image per chunk
        ((3, 1, 4, 5), 2, 4, 2),  # whole items: two, then one
    ],
    ids=["3d_slabs", "2d_rows", "whole_items"],
)
def test_chunks_give_the_same_map_as_one_chunk(shape, items, planes, chunks):
    source, moving = _pair(shape, seed=7)
    settings, spatial = LmiSettings(), shape[2:]
    budget_mb = _budget_mb(shape[0], spatial, settings, items, planes)
    assert box_chunk_voxels(shape[0], spatial, settings, budget_mb) == items * planes * math.prod(spatial[1:])
    events = []
    chunked = lmi_map(source, moving, memory_budget_mb=budget_mb, reporter=CallbackReporter(on_event=events.append))
    whole = lmi_map(source, moving)
    assert len(events) == chunks
    assert (chunked[0] - whole[0]).abs().max() < 1e-6
    assert torch.equal(chunked[1], whole[1])


@pytest.mark.parametrize(
    "shape, options",
    [((1, 1, 12, 10, 9), {}), ((2, 1, 6, 5, 7), dict(window=5, radius=2)), ((3, 1, 20, 16), dict(normalize=False))],
    ids=["3d", "3d_window5", "2d_batch"],
)
def test_memory_budget_is_honoured(shape, options):
    """The chunk fits the budget by the module formula, and the bytes PyTorch allocates stay within it."""
    source, moving = _pair(shape, seed=5)
    settings, batch, spatial = LmiSettings(**options), shape[0], shape[2:]
    budget_mb = _budget_mb(batch, spatial, settings, 1, 2) + 0.01  # a 2-plane slab, not quite 3
    chunk = box_chunk_voxels(batch, spatial, settings, budget_mb)
    planes = chunk // math.prod(spatial[1:])
    assert planes == 2
    assert box_fixed_bytes(batch, spatial) + box_slab_bytes(1, planes, spatial, settings) <= budget_mb * 2**20
    peak = _peak_allocated_bytes(lambda: lmi_map(source, moving, memory_budget_mb=budget_mb, **options))
    # the fixed workspace stands for allocator and library buffers that are no tensors
    assert peak <= budget_mb * 2**20 - WORKSPACE_BYTES


def test_budget_without_room_for_a_plane_falls_back_to_gathers():
    """Large planes on a thin volume: one plane does not fit, the gathers' smaller chunks do."""
    shape = (1, 1, 2, 48, 48)
    source, moving = _pair(shape, seed=9)
    settings, spatial = LmiSettings(), shape[2:]
    budget_mb = _budget_mb(1, spatial, settings, 1, 1) - 0.01
    assert box_chunk_voxels(1, spatial, settings, budget_mb) == 0
    gather_chunk = chunk_voxels_for_budget(1, spatial, settings, budget_mb)
    events = []
    small = lmi_map(source, moving, memory_budget_mb=budget_mb, reporter=CallbackReporter(on_event=events.append))
    large = lmi_map(source, moving)
    assert len(events) == -(-math.prod(spatial) // gather_chunk) > 1
    assert (small[0] - large[0]).abs().max() < 1e-5
    assert (small[1] != large[1]).any(dim=1).float().mean() <= 0.01


@pytest.mark.parametrize("options", [dict(compat=True), dict(compat=False, backend="torch")], ids=["compat", "clean_gathers"])
def test_the_gather_scorers_budget_is_honoured(options, monkeypatch):
    """The gather scorer (compat mode; the clean fallback when no plane fits) keeps the bytes PyTorch allocates within
    the budget, as the box-sum scorer above does."""
    if not options["compat"]:
        monkeypatch.setattr(lmi, "box_chunk_voxels", lambda *args: 0)  # as when no plane fits the budget
    shape = (1, 1, 24, 24, 24)
    source, moving = _pair(shape, seed=0)
    settings, spatial = LmiSettings(compat=options["compat"]), shape[2:]
    budget_mb = (lmi.fixed_bytes(1, spatial, settings) + 200 * lmi.bytes_per_chunk_voxel(3, settings)) / 2**20
    assert 100 < chunk_voxels_for_budget(1, spatial, settings, budget_mb) <= 200  # many chunks of 24³
    peak = _peak_allocated_bytes(lambda: lmi_map(source, moving, memory_budget_mb=budget_mb, **options))
    assert peak <= budget_mb * 2**20 - WORKSPACE_BYTES
