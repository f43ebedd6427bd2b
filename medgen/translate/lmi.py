"""Fast, memory-bounded LMI (locale-based mutual information) map of MIDiffusion, 2D and 3D.

For every voxel u the operator compares the window of ``source`` around u with candidate windows
of ``moving`` displaced by δ ∈ {-r..r}^d, scores each pair by (normalised) mutual information of
Gaussian-kernel histograms, and keeps the best score and its displacement (spec
``diffusion_methods.md`` A.3 and A.8).

Why it is faster than the released algorithm (:mod:`medgen.translate.lmi_reference`):

- the Gaussian kernel is evaluated once per voxel (K values) instead of once per sample of every
  (voxel, candidate) pair;
- the joint entropy uses -Σ p·log p = (Σ entr(J) + S·ln Z)/Z with Z = S + ε, S = Σ J, which
  needs one pass over the K×K joint instead of four (the ε inside log2(p+ε) changes each
  entropy by < 729·ε bits, far below float32 resolution);
- voxels are processed in chunks sized from a memory budget, all chunk voxels of one candidate
  at once, so a GPU sees few, large kernels.

The joints J(u,δ) = Σ_w κ_S(u+w) ⊗ κ_X(u+δ+w) (w over the window, K×K each) are built in one of
two ways with PyTorch ops:

- clean mode, box sums (:class:`_BoxSumScorer`): with replicate padding a window sample is a
  clamped coordinate, so J(·,δ) is the box sum (edge p per axis) of the per-voxel outer products
  O_δ(v) = κ_S(clamp(v)) ⊗ κ_X(clamp(v+δ)) over the volume grown by p//2 voxels per side. A chunk
  is a slab of whole planes of the first spatial axis (or whole items); per candidate, one batched
  matmul with inner dimension p sums O_δ along the last axis and a separable box filter (p-1
  elementwise adds per axis) sums the others. That replaces gathering n·K moving values and an
  (K×n)·(n×K) matmul per (voxel, candidate): 2.2-2.5× faster on one CPU thread at 24³-48³
  (over half of the remaining time is entr over the joints). The moving marginal and its
  entropy at u+δ are those of the plain window at u+δ, computed once per slab; the joint's mass
  is the box sum of the product of the kernel row sums. Compat mode pairs samples in a
  non-shift-invariant way (quirk Q1), so it cannot be written as a box sum;
- compat mode, and clean mode when the budget cannot hold one plane (:class:`_TorchScorer`):
  both kernel fields are precomputed and the chunk's windows gathered from them by index, one
  (K+1×n)·(n×K) batched matmul per candidate.

Peak memory (bytes), with V = B·∏L voxels, n = p**ndim samples, K bins, h = p//2, Q = 2r+1 steps
per axis and C = Q**ndim candidates. Box sums, a chunk of P planes of each of k items (P = L_0 for
whole items), A_x = ∏_{i≥1}(L_i + 2x), A'_h = ∏_{1≤i<ndim-1}(L_i + 2h)·L_{ndim-1}::

    S = (P+2h)·A_h   M = (P+2h+2r)·A_{h+r}   R = (P+2h)·A'_h   R1 = P·A'_h
    U = (P+2r)·A_r   N = P·∏_{i≥1} L_i

    peak ≤ (20+16·ndim)·V + 32 MiB
           + 1.1·k·4·(4S + (4K+1)·M + 2pK·R + K²·(R + R1) + U + (C+12)·N)

(slab kernel fields, the window rows of the batched matmul, the two K×K joint buffers R and R1,
the moving entropy field U, per-voxel scores and temporaries). For p=3, K=27, 3D this is
≈ 68·V + 32 MiB + 7.8 kB per chunk voxel plus the halo planes: a 128³ map needs ≈ 0.18 GB plus
≈ 0.29 GB for a one-plane chunk and 0.13 GB per further plane. Gathers, N voxels per chunk,
Vp = B·∏(L+1)::

    peak ≤ 4·(3K+2)·Vp + (12+16·ndim)·V + 32 MiB
           + 1.1·N·(4·((2K+1)·n + (2K+1)·K + 7K + C + 2n + 4) + 8·(3n + 2·ndim·Q·p))

The first line is held for the whole call (kernel fields, outputs, library workspace), the second
is one chunk in flight (1.1 covers allocator slack). For p=3, K=27, 3D this is ≈ 400·V + 32 MiB
+ 15.5 kB·N: a 128³ map needs ≈ 0.83 GB plus the chunk.

:func:`box_chunk_voxels` and :func:`chunk_voxels_for_budget` pick the largest chunk that keeps
this under ``memory_budget_mb``.
"""

from __future__ import annotations

import bisect
import itertools
import math

import torch

from medgen.errors import BadInputError, OutOfMemoryError
from medgen.progress import Reporter, as_reporter
from medgen.translate.lmi_core import (
    DEFAULT_SIGMA,
    EPSILON,
    LmiSettings,
    candidate_displacements,
    check_volume_pair,
    histogram_entropy,
    kernel_values,
    marginal_entropy,
    mutual_information_score,
    offsets_from_candidates,
    pick_best_candidate,
    to_kernel_units,
)

#: default budget: a 128³ map with p=3 needs about 0.83 GB fixed, leaving ~12k voxels per chunk
DEFAULT_MEMORY_BUDGET_MB = 1024.0
#: allowance for allocator, BLAS and thread-pool workspaces that no tensor accounts for
WORKSPACE_BYTES = 32 * 2**20


def fixed_bytes(batch: int, spatial: tuple[int, ...], settings: LmiSettings) -> int:
    """Bytes held for the whole call: two kernel fields and their row sums over the volume padded
    by one plane per axis (Vp voxels), one field's worth of temporaries while they are built, the
    outputs (score, candidate index, offsets and their reordered copy) and a fixed workspace for
    allocator and BLAS/thread-pool buffers (measured ≈ 17 MB on CPU)."""
    voxels = batch * math.prod(spatial)
    padded_voxels = batch * math.prod(n + 1 for n in spatial)
    return 4 * (3 * settings.bins + 2) * padded_voxels + (12 + 16 * len(spatial)) * voxels + WORKSPACE_BYTES


def bytes_per_chunk_voxel(ndim: int, settings: LmiSettings) -> int:
    """Bytes one voxel of a chunk holds while one candidate is scored (see the module formula).

    Live at once: the source windows with a ones row (K+1)·n, the gathered moving windows n·K,
    the joint with the marginal row (K+1)·K, one K² temporary, small per-voxel vectors and the
    int64 window indices; plus 10% for allocator rounding and fragmentation (measured on CPU).
    """
    samples, bins = settings.window**ndim, settings.bins
    steps = 2 * settings.radius + 1
    floats = (2 * bins + 1) * samples + (2 * bins + 1) * bins + 7 * bins + steps**ndim + 2 * samples + 4
    indices = 3 * samples + 2 * ndim * steps * settings.window
    return int(1.1 * (4 * floats + 8 * indices))


def _equal_share(total: int, largest: int) -> int:
    """Size of equal parts of ``total`` when no part may exceed ``largest``: a short last part would
    allocate odd sizes that fragment the host heap."""
    return -(-total // -(-total // largest))


def _chunk_voxels(
    batch: int, spatial: tuple[int, ...], fixed: int, per_voxel: int, memory_budget_mb: float
) -> int:
    """Largest equal chunk (voxels) with ``fixed + chunk·per_voxel`` bytes within ``memory_budget_mb``.

    Raises:
        BadInputError: when the budget cannot hold the fixed part plus a 64-voxel chunk.
    """
    budget = memory_budget_mb * 2**20
    minimum_chunk = 64
    if budget < fixed + minimum_chunk * per_voxel:
        needed_mb = math.ceil((fixed + minimum_chunk * per_voxel) / 2**20)
        raise BadInputError(
            f"memory_budget_mb={memory_budget_mb} is too small for an LMI map of {batch}×{spatial}: "
            f"at least {needed_mb} MB are needed; raise the budget or use smaller volumes."
        )
    voxels = batch * math.prod(spatial)
    return _equal_share(voxels, min(voxels, int((budget - fixed) // per_voxel)))


def chunk_voxels_for_budget(
    batch: int, spatial: tuple[int, ...], settings: LmiSettings, memory_budget_mb: float
) -> int:
    """Voxels per chunk of the PyTorch operator whose peak memory stays within ``memory_budget_mb``.

    Raises:
        BadInputError: when the budget cannot hold even the fixed part plus one small chunk.
    """
    fixed = fixed_bytes(batch, spatial, settings)
    per_voxel = bytes_per_chunk_voxel(len(spatial), settings)
    return _chunk_voxels(batch, spatial, fixed, per_voxel, memory_budget_mb)


def box_fixed_bytes(batch: int, spatial: tuple[int, ...]) -> int:
    """Bytes the box-sum scorer holds for the whole call: both volumes clamped to [0, 1] (float32),
    the outputs (score, candidate index, offsets and their reordered copy) and the fixed workspace."""
    voxels = batch * math.prod(spatial)
    return (20 + 16 * len(spatial)) * voxels + WORKSPACE_BYTES


def box_slab_bytes(items: int, planes: int, spatial: tuple[int, ...], settings: LmiSettings) -> int:
    """Peak bytes of :class:`_BoxSumScorer` scoring ``planes`` planes (first spatial axis) of ``items`` items.

    Live at once (float32, module formula): the source row sums and three temporaries of the mass
    (4S); the moving kernel field with its row sums, plus 3K·M for the kernel and box-sum
    temporaries of the moving field before the candidate loop (which never exceed it); the window
    rows of both operands of the batched matmul (2pK·R); the two K×K joint buffers (K²·(R+R1));
    the moving entropy field (U); per voxel the C scores, the source entropy, the int64 voxel index
    and about nine entropy temporaries ((C+12)·N). Plus 10 % for the allocator, as for the gathers.
    """
    window, radius, bins = settings.window, settings.radius, settings.bins
    half, rest = window // 2, spatial[1:]
    source = (planes + 2 * half) * math.prod(n + 2 * half for n in rest)
    moving = (planes + 2 * half + 2 * radius) * math.prod(n + 2 * half + 2 * radius for n in rest)
    row_plane = math.prod(n + 2 * half for n in rest[:-1]) * rest[-1]  # the last axis is summed by the matmul
    rows, first_pass = (planes + 2 * half) * row_plane, planes * row_plane
    entropy_field = (planes + 2 * radius) * math.prod(n + 2 * radius for n in rest)
    voxels = planes * math.prod(rest)
    candidates = (2 * radius + 1) ** len(spatial)
    floats = (
        4 * source + (4 * bins + 1) * moving + 2 * window * bins * rows + bins**2 * (rows + first_pass)
        + entropy_field + (candidates + 12) * voxels
    )
    return items * int(1.1 * 4 * floats)


def box_chunk_voxels(batch: int, spatial: tuple[int, ...], settings: LmiSettings, memory_budget_mb: float) -> int:
    """Voxels per chunk of the box-sum scorer within ``memory_budget_mb``: as many whole items as fit,
    else as many planes of the first spatial axis as fit; 0 when not even one plane fits (the
    caller then gathers with :class:`_TorchScorer`, whose chunks can be smaller)."""
    room = memory_budget_mb * 2**20 - box_fixed_bytes(batch, spatial)
    length, plane_voxels = spatial[0], math.prod(spatial[1:])
    items = int(room // box_slab_bytes(1, length, spatial, settings))
    if items >= 1:
        return _equal_share(batch, min(items, batch)) * length * plane_voxels
    planes = bisect.bisect_right(range(1, length), room, key=lambda count: box_slab_bytes(1, count, spatial, settings))
    return _equal_share(length, planes) * plane_voxels if planes else 0


def _axis_sample_coordinates(length: int, settings: LmiSettings, displaced: bool, device: torch.device) -> torch.Tensor:
    """Coordinates sampled along one axis, shape ``(Q, p, length)`` int64.

    Entry [q, a, i] is the coordinate of window sample a for the q-th displacement along this axis
    at voxel coordinate i. ``displaced=False`` gives the plain window (Q = 1). Samples outside the
    volume: compat reads index ``length``, the zero-padding plane appended by :func:`_kernel_field`
    (the released code zero-pads); clean reads the nearest edge voxel (replicate padding).

    Why clean replicates: a zero plane is an intensity of the *input's* modality. Where the
    background is dark in one modality and bright in another, zero padding adds an edge at the
    volume border in one and not the other, so the border LMI stops being modality-invariant
    (textured phantoms, 16² slices: mean |LMI(S,S) - LMI(T,T)| at the 2-voxel border ring 0.10
    with zero padding vs 0.004 with replicate padding; 0.006 in the interior either way).
    """
    half = settings.window // 2
    position = torch.arange(length, device=device).view(1, 1, -1)
    sample = torch.arange(settings.window, device=device).view(1, -1, 1)
    steps = 2 * settings.radius + 1 if displaced else 1
    candidate = torch.arange(steps, device=device).view(-1, 1, 1)
    if displaced and settings.compat:
        # Released double unfold (quirk Q1): sample a of candidate X reads the window-expanded image
        # at m = p·i + X + a - half, i.e. element m % p of the window of voxel m // p.
        expanded = settings.window * position + candidate + sample - half
        coordinate = torch.div(expanded, settings.window, rounding_mode="floor") + expanded % settings.window - half
        inside = (expanded >= 0) & (expanded < settings.window * length)
    else:
        shift = candidate - settings.radius if displaced else 0
        coordinate = position + shift + sample - half
        if not settings.compat:
            return coordinate.clamp(0, length - 1)
        inside = torch.ones_like(coordinate, dtype=torch.bool)
    inside &= (coordinate >= 0) & (coordinate < length)
    return torch.where(inside, coordinate, torch.full_like(coordinate, length))


def _chunk_axis_offsets(
    axis_tables: list[torch.Tensor], voxel_coords: list[torch.Tensor], padded: tuple[int, ...]
) -> list[torch.Tensor]:
    """Per axis, the flat-index contribution of every sample of the chunk's voxels, ``(N, Q, p)``."""
    strides = [math.prod(padded[axis + 1 :]) for axis in range(len(padded))]
    return [
        table[:, :, coords].permute(2, 0, 1) * stride
        for table, coords, stride in zip(axis_tables, voxel_coords, strides)
    ]


def _window_indices(
    axis_offsets: list[torch.Tensor], candidate: tuple[int, ...], item_base: torch.Tensor
) -> torch.Tensor:
    """Kernel-field rows of every window sample for one candidate, ``(N, p**ndim)`` int64, raster order."""
    ndim = len(axis_offsets)
    flat = item_base.view(-1, *([1] * ndim))
    for axis, offsets in enumerate(axis_offsets):
        view = [offsets.shape[0]] + [1] * ndim
        view[1 + axis] = offsets.shape[2]
        flat = flat + offsets[:, candidate[axis]].view(view)
    return flat.reshape(flat.shape[0], -1)


def _joint_entropy_bits(joint: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each unnormalised joint histogram ``(N, K, K)`` of total ``mass``; overwrites ``joint``.

    Uses -Σ (J/Z)·ln(J/Z) = (Σ entr(J) + S·ln Z)/Z with S = Σ J and Z = S + ε (the released
    normaliser), which is one elementwise pass instead of the released four.
    """
    normaliser = mass + EPSILON
    plogp_sum = torch.special.entr(joint, out=joint).sum(dim=(1, 2))
    return (plogp_sum + mass * torch.log(normaliser)) / (normaliser * math.log(2.0))


def _kernel_field(volume: torch.Tensor, settings: LmiSettings) -> torch.Tensor:
    """Kernel values of every voxel with one zero-padding plane appended per axis, ``(B·∏(L+1), K)``."""
    ndim = volume.dim() - 2
    units = torch.nn.functional.pad(to_kernel_units(volume, settings), (0, 1) * ndim)
    return kernel_values(units.reshape(-1), settings)


#: kernels the operator can run on; "auto" picks Triton on CUDA when it is installed, PyTorch otherwise
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    """True when the fused Triton kernel can be imported (Triton installed; a CUDA build or its interpreter)."""
    try:
        import medgen.translate.lmi_triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise BadInputError(f"LMI backend must be one of {list(BACKENDS)}, got {backend!r}.")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise BadInputError(
            "LMI backend 'triton' needs the triton package (shipped with CUDA builds of PyTorch); "
            "use backend='torch' or 'auto'."
        )
    return backend


def triton_chunk_voxels(batch: int, spatial: tuple[int, ...], settings: LmiSettings, memory_budget_mb: float) -> int:
    """Voxels per chunk of the Triton path: two padded float32 volumes and the outputs are held for the
    call, each chunk voxel adds its C float32 scores and their argmax; 10 % allowance for the allocator.

    Raises:
        BadInputError: when the budget cannot hold the volumes plus a small chunk.
    """
    voxels = batch * math.prod(spatial)
    padded_voxels = batch * math.prod(n + 1 for n in spatial)
    candidates = (2 * settings.radius + 1) ** len(spatial)
    fixed = 8 * padded_voxels + (12 + 16 * len(spatial)) * voxels + WORKSPACE_BYTES
    per_voxel = int(1.1 * (4 * candidates + 16))
    return _chunk_voxels(batch, spatial, fixed, per_voxel, memory_budget_mb)


class _TorchScorer:
    """Candidate scores of a voxel run with PyTorch ops: kernel fields gathered by index, one batched
    matmul per candidate for the joints (see the module docstring for the memory formula). Used for
    compat mode, and for clean mode when the budget cannot hold one plane for :class:`_BoxSumScorer`."""

    def __init__(self, source, moving, spatial, window_tables, candidate_tables, settings):
        self.settings, self.spatial = settings, spatial
        self.window_tables, self.candidate_tables = window_tables, candidate_tables
        self.padded = tuple(n + 1 for n in spatial)
        self.source_field = _kernel_field(source, settings)
        self.moving_field = _kernel_field(moving, settings)
        # Σ_{k,l} J = Σ_i (Σ_k κ(a_i))·(Σ_l κ(b_i)): the joint's mass from per-sample sums, no K×K pass
        self.source_row_sums, self.moving_row_sums = self.source_field.sum(dim=1), self.moving_field.sum(dim=1)
        ndim = len(spatial)
        self.candidates = list(itertools.product(range(2 * settings.radius + 1), repeat=ndim))

    def __call__(self, voxel: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` scores of the flat voxel indices ``voxel`` (N,)."""
        settings, bins, ndim = self.settings, self.settings.bins, len(self.spatial)
        voxels_per_item = math.prod(self.spatial)
        item_base = (voxel // voxels_per_item) * math.prod(self.padded)
        voxel_coords = list(torch.unravel_index(voxel % voxels_per_item, self.spatial))
        window_offsets = _chunk_axis_offsets(self.window_tables, voxel_coords, self.padded)
        window_rows = _window_indices(window_offsets, (0,) * ndim, item_base)
        source_windows = self.source_field[window_rows]  # (N, n, K)
        source_entropy = marginal_entropy(source_windows)
        source_sample_sums = self.source_row_sums[window_rows]
        # a row of ones under Aᵀ makes the joint matmul also return Σ_i κ(b_i), the moving marginal
        source_windows_t = torch.ones((voxel.numel(), bins + 1, window_rows.shape[1]), device=voxel.device)
        source_windows_t[:, :bins] = source_windows.transpose(1, 2)  # (N, K+1, n), contiguous for bmm
        del source_windows
        candidate_offsets = _chunk_axis_offsets(self.candidate_tables, voxel_coords, self.padded)
        scores = torch.empty((voxel.numel(), len(self.candidates)), dtype=torch.float32, device=voxel.device)
        for index, candidate in enumerate(self.candidates):
            rows = _window_indices(candidate_offsets, candidate, item_base)
            joint_and_marginal = torch.bmm(source_windows_t, self.moving_field[rows])  # (N, K+1, K)
            moving_entropy = histogram_entropy(joint_and_marginal[:, -1] / rows.shape[1])
            mass = (source_sample_sums * self.moving_row_sums[rows]).sum(dim=1)
            joint_entropy = _joint_entropy_bits(joint_and_marginal[:, :-1], mass)
            scores[:, index] = mutual_information_score(
                source_entropy, moving_entropy, joint_entropy, settings.normalize
            )
        return scores


def _replicate_region(units: torch.Tensor, first: int, stop: int, halo: int) -> torch.Tensor:
    """Planes ``first:stop`` of the items ``units`` ``(b, *L)`` grown by ``halo`` voxels on each side of
    every spatial axis, reading the nearest edge voxel beyond the volume (replicate padding).

    Returns:
        ``(b, stop - first + 2·halo, L_1 + 2·halo, ...)``.
    """
    region = units
    for axis, length in enumerate(units.shape[1:], start=1):
        low, high = (first, stop) if axis == 1 else (0, length)
        coordinates = torch.arange(low - halo, high + halo, device=units.device).clamp(0, length - 1)
        region = region.index_select(axis, coordinates)
    return region


def _box_sum(
    field: torch.Tensor, width: int, axes: tuple[int, ...], buffers: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """Sums of ``width`` consecutive entries along each of ``axes`` (valid part: each axis shrinks by
    ``width - 1``), one pass of ``width - 1`` elementwise adds per axis (a separable box filter).

    With ``buffers`` (two flat tensors, ``field`` a view of the first) the passes write alternately
    into the second and the first instead of allocating; the result is a contiguous view of one.
    """
    if width == 1:
        return field
    for step, axis in enumerate(axes):
        length = field.shape[axis] - width + 1
        shape = field.shape[:axis] + (length,) + field.shape[axis + 1 :]
        out = None if buffers is None else buffers[(step + 1) % 2][: math.prod(shape)].view(shape)
        out = torch.add(field.narrow(axis, 0, length), field.narrow(axis, 1, length), out=out)
        for offset in range(2, width):
            out += field.narrow(axis, offset, length)
        field = out
    return field


def _window_rows(kernels: torch.Tensor, window: int) -> torch.Tensor:
    """The windows along the last spatial axis of a kernel field ``(b, *E, K)`` as matmul operands
    ``(b, *E[:-1], E_last - window + 1, K, window)`` (a strided view)."""
    return kernels.unfold(kernels.dim() - 2, window, 1)


def _plane_boxes(first: int, stop: int, length: int) -> list[tuple[slice, slice]]:
    """Split the run of planes ``first:stop`` (plane g is plane g % length of item g // length) into
    boxes ``(items, planes)``: consecutive whole items together, a partial item on its own."""
    boxes = []
    while first < stop:
        item, plane = divmod(first, length)
        if plane == 0 and stop - first >= length:
            count = (stop - first) // length
            boxes.append((slice(item, item + count), slice(0, length)))
            first += count * length
        else:
            end = min(length, plane + stop - first)
            boxes.append((slice(item, item + 1), slice(plane, end)))
            first += end - plane
    return boxes


class _BoxSumScorer:
    """Clean-mode candidate scores of a run of whole planes from box sums of per-voxel outer products
    (module docstring): per candidate, one batched matmul of inner dimension p along the last axis
    and a separable box filter over the others, in two joint buffers reused by every candidate.

    Written by hand: neither PyTorch nor MONAI has windowed (local) joint histograms, and a K²-channel
    ``avg_pool`` would divide and re-multiply every sum and sum the window in one p**ndim pass.
    """

    def __init__(self, source: torch.Tensor, moving: torch.Tensor, settings: LmiSettings):
        self.settings = settings
        self.source_units = to_kernel_units(source, settings)[:, 0]  # (B, *L), clamped to [0, 1]
        self.moving_units = to_kernel_units(moving, settings)[:, 0]
        ndim = source.dim() - 2
        self.candidates = list(itertools.product(range(2 * settings.radius + 1), repeat=ndim))

    def __call__(self, voxel: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` scores of the flat voxel run ``voxel`` (N,), whole planes of the first spatial axis."""
        spatial = self.source_units.shape[1:]
        plane_voxels = math.prod(spatial[1:])
        first = int(voxel[0]) // plane_voxels
        scores = torch.empty((voxel.numel(), len(self.candidates)), dtype=torch.float32, device=voxel.device)
        done = 0
        for items, planes in _plane_boxes(first, first + voxel.numel() // plane_voxels, spatial[0]):
            count = (items.stop - items.start) * (planes.stop - planes.start) * plane_voxels
            self._score_box(items, planes, scores[done : done + count])
            done += count
        return scores

    def _kernel_terms(
        self, units: torch.Tensor, items: slice, planes: slice, halo: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Kernel field ``(b, *E, K)`` of the planes of ``units`` grown by ``halo`` per side, its row sums
        ``(b, *E)`` and the entropies in bits ``(b, *(E - p + 1))`` of the windows that fit inside it."""
        settings, ndim = self.settings, units.dim() - 1
        kernels = kernel_values(_replicate_region(units[items], planes.start, planes.stop, halo), settings)
        window_sums = _box_sum(kernels, settings.window, tuple(range(1, ndim + 1)))
        entropy = histogram_entropy(window_sums.reshape(-1, settings.bins) / settings.window**ndim)
        return kernels, kernels.sum(dim=-1), entropy.view(window_sums.shape[:-1])

    def _source_terms(self, items: slice, planes: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Source side of a box, computed once for all candidates: the matmul rows ``(R, K, p)``, the
        kernel row sums ``(b, *E)`` over the box grown by p//2 and the window entropies ``(b·P·∏L_i,)``."""
        kernels, sums, entropy = self._kernel_terms(self.source_units, items, planes, self.settings.window // 2)
        rows = _window_rows(kernels, self.settings.window).reshape(-1, self.settings.bins, self.settings.window)
        return rows, sums, entropy.reshape(-1)

    def _score_box(self, items: slice, planes: slice, scores: torch.Tensor) -> None:
        """Write the ``(b·P·∏L_i, C)`` scores of planes ``planes`` of items ``items`` into ``scores``."""
        settings, ndim = self.settings, self.source_units.dim() - 1
        window, bins, spatial_axes = settings.window, settings.bins, tuple(range(1, ndim + 1))
        source_rows, source_sums, source_entropy = self._source_terms(items, planes)
        # the moving box grown by r more voxels holds the source box shifted by every δ; the moving
        # window at u+δ is the plain window there, so one entropy field serves every candidate
        moving, moving_sums, moving_entropy = self._kernel_terms(
            self.moving_units, items, planes, window // 2 + settings.radius
        )
        grown = source_sums.shape  # (b, P+2h, L_1+2h, ...)
        box_shape = (grown[0], planes.stop - planes.start) + tuple(self.source_units.shape[2:])
        row_shape = grown[:-1] + box_shape[-1:]  # one matmul row per window along the last axis
        moving_rows = torch.empty((source_rows.shape[0], window, bins), device=moving.device)
        # the joint buffers: the matmul's output, and the first box pass's (one axis shrunk to P)
        buffers = tuple(
            torch.empty(math.prod(shape) * bins**2, device=moving.device)
            for shape in (row_shape, box_shape[:2] + row_shape[2:])
        )
        for index, shift in enumerate(self.candidates):
            aligned = (slice(None),) + tuple(slice(step, step + n) for step, n in zip(shift, grown[1:]))
            moving_rows.view(*row_shape, window, bins).copy_(_window_rows(moving[aligned], window).transpose(-1, -2))
            joint = torch.bmm(source_rows, moving_rows, out=buffers[0].view(-1, bins, bins))
            joint = _box_sum(joint.view(*row_shape, bins, bins), window, spatial_axes[:-1], buffers)
            mass = _box_sum(source_sums * moving_sums[aligned], window, spatial_axes).reshape(-1)
            centred = (slice(None),) + tuple(slice(step, step + n) for step, n in zip(shift, box_shape[1:]))
            scores[:, index] = mutual_information_score(
                source_entropy,
                moving_entropy[centred].reshape(-1),
                _joint_entropy_bits(joint.reshape(-1, bins, bins), mass),
                settings.normalize,
            )


class _TritonScorer:
    """Candidate scores of a voxel run with the fused kernel of :mod:`medgen.translate.lmi_triton`."""

    def __init__(self, source, moving, spatial, window_tables, candidate_tables, settings):
        from medgen.translate.lmi_triton import candidate_scores

        ndim = len(spatial)
        self.score = candidate_scores
        self.units = [
            torch.nn.functional.pad(to_kernel_units(volume, settings), (0, 1) * ndim)[:, 0].contiguous()
            for volume in (source, moving)
        ]
        self.arguments = (spatial, window_tables, candidate_tables, settings)

    def __call__(self, voxel: torch.Tensor) -> torch.Tensor:
        start, count = int(voxel[0]), voxel.numel()
        return self.score(*self.units, *self.arguments, start, count)


def _scorer_and_chunk(
    source: torch.Tensor, moving: torch.Tensor, settings: LmiSettings, backend: str, memory_budget_mb: float
) -> tuple[_BoxSumScorer | _TorchScorer | _TritonScorer, int]:
    """The scorer of one call and its voxels per chunk: box sums for clean mode with PyTorch ops when
    one plane fits the budget, else gathers from kernel fields (PyTorch) or the fused kernel (Triton).

    Raises:
        BadInputError: when the budget cannot hold the fixed part plus a small chunk.
    """
    batch, spatial, device = source.shape[0], tuple(source.shape[2:]), source.device
    if backend == "torch" and not settings.compat:
        chunk_voxels = box_chunk_voxels(batch, spatial, settings, memory_budget_mb)
        if chunk_voxels:
            return _BoxSumScorer(source, moving, settings), chunk_voxels
    if backend == "triton":
        chunk_voxels, scorer_class = triton_chunk_voxels(batch, spatial, settings, memory_budget_mb), _TritonScorer
    else:
        chunk_voxels, scorer_class = chunk_voxels_for_budget(batch, spatial, settings, memory_budget_mb), _TorchScorer
    window_tables = [_axis_sample_coordinates(n, settings, False, device) for n in spatial]
    candidate_tables = [_axis_sample_coordinates(n, settings, True, device) for n in spatial]
    return scorer_class(source, moving, spatial, window_tables, candidate_tables, settings), chunk_voxels


def lmi_map(
    source: torch.Tensor,
    moving: torch.Tensor,
    *,
    window: int = 3,
    radius: int = 1,
    bins: int = 27,
    sigma: float = DEFAULT_SIGMA,
    normalize: bool = True,
    compat: bool = False,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    backend: str = "auto",
    reporter: Reporter | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Locale-based mutual information map M_{source,moving} and the best displacement per voxel.

    Args:
        source: reference image S, ``(B, 1, H, W)`` or ``(B, 1, D, H, W)``, intensities nominally in
            [0, 1] (a noisy diffusion sample may leave that range).
        moving: image X compared with S (target image or noisy sample x_t), same shape and device.
        window: odd window edge p; each window holds p**ndim samples (beyond the border: the
            nearest edge voxel in clean mode, zero in compat mode).
        radius: displacements searched per axis, δ ∈ {-radius..radius}**ndim.
        bins: K kernel-density bins evenly spaced over the intensity range.
        sigma: Gaussian kernel standard deviation in [0, 1] intensity units (default 8/255, the
            released ``MIsigma: 2``; see :class:`medgen.translate.lmi_core.LmiSettings`).
        normalize: NMI = 2·MI/(H(S)+H(X)) in [≈0, 1] if True, else MI in bits. Use one value for
            training and sampling (the released configs mixed them: quirk Q3).
        compat: False (default) is the clean operator: inputs clamped to [0, 1], no quantisation,
            true windows centred at u+δ, replicate padding, ties resolved toward δ = 0. True reproduces the released
            2D definition: zero padding, trunc(255·v) without clamping (so far out-of-range windows give
            NMI = 2, quirk Q2), kernel width 2σ² = 8 grey levels, p³ bins, the released candidate
            windows that sample [u, u+d, u] on a displaced axis (quirk Q1) and first-in-raster ties.
            Values agree with the released code to float32 rounding (summation order differs);
            3D compat applies the released per-axis rule to all three axes (an extension).
        memory_budget_mb: upper bound for this call's tensors; sets the voxels per chunk
            (module docstring gives the formula). Raise it on a GPU for speed.
        backend: "torch" (PyTorch ops, any device; box sums in clean mode, gathers in compat
            mode, see the module docstring), "triton" (fused kernel of
            :mod:`medgen.translate.lmi_triton`, needs Triton; runs on CUDA or under Triton's CPU
            interpreter) or "auto" (Triton on CUDA when installed, else PyTorch). Both give the
            same values to float32 rounding.
        reporter: optional progress/cancel hook; one ``progress("lmi", chunk, chunks)`` per chunk.

    Returns:
        ``(lmi, offsets)``: ``lmi`` float32 with the input's shape, the best score per voxel;
        ``offsets`` int64 ``(B, ndim, *spatial)``, the displacement δ* (tensor axis order) at which
        the window of ``moving`` around u+δ* matches the window of ``source`` around u best.

    Raises:
        BadInputError: wrong rank/channels, different shapes or devices, NaN/inf values, invalid
            settings or backend, or a budget too small for the volume.
        OutOfMemoryError: the device ran out of memory; lower ``memory_budget_mb``.
    """
    settings = LmiSettings(window, radius, bins, sigma, normalize, compat)
    ndim = check_volume_pair(source, moving)
    reporter = as_reporter(reporter)
    batch, spatial, device = source.shape[0], tuple(source.shape[2:]), source.device
    backend = _resolve_backend(backend, device)
    total_voxels = batch * math.prod(spatial)
    displacements = candidate_displacements(ndim, settings)
    try:
        scorer, chunk_voxels = _scorer_and_chunk(source, moving, settings, backend, memory_budget_mb)
        lmi = torch.empty(total_voxels, dtype=torch.float32, device=device)
        best_candidate = torch.empty(total_voxels, dtype=torch.long, device=device)
        chunk_starts = range(0, total_voxels, chunk_voxels)
        for step, start in enumerate(chunk_starts):
            reporter.check_cancelled()
            voxel = torch.arange(start, min(start + chunk_voxels, total_voxels), device=device)
            scores = scorer(voxel)
            lmi[voxel], best_candidate[voxel] = pick_best_candidate(scores, displacements.shape[0] // 2, not compat)
            reporter.progress("lmi", step + 1, len(chunk_starts))
    except torch.OutOfMemoryError as error:
        raise OutOfMemoryError(
            f"LMI map of {batch}×{spatial} ran out of memory on {device} with memory_budget_mb={memory_budget_mb}; "
            "lower memory_budget_mb (smaller chunks) or free device memory."
        ) from error
    offsets = offsets_from_candidates(best_candidate.view(batch, *spatial), displacements)
    return lmi.view(batch, 1, *spatial), offsets
