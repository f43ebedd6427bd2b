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

- clean mode: box sums of per-voxel outer products over slabs of whole planes
  (:class:`medgen.translate.lmi_box.BoxSumScorer`, which gives its own memory formula);
- compat mode, whose candidate windows (quirk Q1) are no box sums, and clean mode when the budget
  cannot hold one plane (:class:`_TorchScorer`): both kernel fields are precomputed and the chunk's
  windows gathered from them by index, one (K+1×n)·(n×K) batched matmul per candidate.

Peak memory (bytes) of the gathers, with V = B·∏L voxels, Vp = B·∏(L+1), n = p**ndim samples, K
bins, Q = 2r+1 steps per axis, C = Q**ndim candidates and N voxels per chunk::

    peak ≤ 4·(3K+2)·Vp + (12+16·ndim)·V + 32 MiB
           + 1.1·N·(4·((2K+1)·n + (2K+1)·K + 7K + C + 2n + 4) + 8·(3n + 2·ndim·Q·p))

The first line is held for the whole call (kernel fields, outputs, library workspace), the second
is one chunk in flight (1.1 covers allocator slack). For p=3, K=27, 3D this is ≈ 400·V + 32 MiB
+ 15.5 kB·N: a 128³ map needs ≈ 0.83 GB plus the chunk.

:func:`chunk_voxels_for_budget` picks the largest N that keeps this under ``memory_budget_mb``.
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch

from medgen.errors import BadInputError, OutOfMemoryError, is_out_of_memory
from medgen.progress import Reporter, as_reporter
from medgen.translate.lmi_box import BoxSumScorer, box_chunk_voxels
from medgen.translate.lmi_core import (
    DEFAULT_SIGMA,
    WORKSPACE_BYTES,
    LmiSettings,
    candidate_displacements,
    check_volume_pair,
    equal_share,
    histogram_entropy,
    joint_entropy_bits,
    kernel_values,
    marginal_entropy,
    mutual_information_score,
    offsets_from_candidates,
    pick_best_candidate,
    to_kernel_units,
)

#: default budget: a 128³ map with p=3 needs about 0.83 GB fixed, leaving ~12k voxels per chunk
DEFAULT_MEMORY_BUDGET_MB = 1024.0


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
    return equal_share(voxels, min(voxels, int((budget - fixed) // per_voxel)))


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


def _kernel_field(volume: torch.Tensor, settings: LmiSettings) -> torch.Tensor:
    """Kernel values of every voxel with one zero-padding plane appended per axis, ``(B·∏(L+1), K)``."""
    ndim = volume.dim() - 2
    units = torch.nn.functional.pad(to_kernel_units(volume, settings), (0, 1) * ndim)
    return kernel_values(units.reshape(-1), settings)


#: kernels the operator can run on; "auto" picks Triton on CUDA when it is installed, PyTorch otherwise
BACKENDS = ("auto", "torch", "triton")


#: the oldest Triton the kernel's tests have passed with (3.4, shipped with torch 2.8, MONAI 1.6's oldest torch);
#: 3.0 (torch 2.4's) rejects its block sizes passed on to helper functions ("arange's arguments must be of type
#: tl.constexpr"), and 3.1-3.3 are untested
MIN_TRITON_VERSION = (3, 4)


def _triton_version() -> str | None:
    """The installed Triton's version string, or None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    return str(triton.__version__)


def triton_available() -> bool:
    """True when the fused Triton kernel can run: Triton >= :data:`MIN_TRITON_VERSION` (CUDA builds of PyTorch
    ship it; without a GPU it runs under Triton's CPU interpreter)."""
    version = _triton_version()
    if version is None or tuple(int(part) for part in version.split(".")[:2]) < MIN_TRITON_VERSION:
        return False
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
        minimum = ".".join(map(str, MIN_TRITON_VERSION))
        raise BadInputError(
            f"LMI backend 'triton' needs triton >= {minimum} (found: {_triton_version() or 'not installed'}; CUDA "
            "builds of PyTorch >= 2.8 ship it); use backend='torch' or 'auto'."
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
    compat mode, and for clean mode when the budget cannot hold one plane for :class:`BoxSumScorer`."""

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
            joint_entropy = joint_entropy_bits(joint_and_marginal[:, :-1], mass)
            scores[:, index] = mutual_information_score(
                source_entropy, moving_entropy, joint_entropy, settings.normalize
            )
        return scores


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
) -> tuple[BoxSumScorer | _TorchScorer | _TritonScorer, int]:
    """The scorer of one call and its voxels per chunk: box sums for clean mode with PyTorch ops when
    one plane fits the budget, else gathers from kernel fields (PyTorch) or the fused kernel (Triton).

    Raises:
        BadInputError: when the budget cannot hold the fixed part plus a small chunk.
    """
    batch, spatial, device = source.shape[0], tuple(source.shape[2:]), source.device
    if backend == "torch" and not settings.compat:
        chunk_voxels = box_chunk_voxels(batch, spatial, settings, memory_budget_mb)
        if chunk_voxels:
            return BoxSumScorer(source, moving, settings), chunk_voxels
    if backend == "triton":
        chunk_voxels, scorer_class = triton_chunk_voxels(batch, spatial, settings, memory_budget_mb), _TritonScorer
    else:
        chunk_voxels, scorer_class = chunk_voxels_for_budget(batch, spatial, settings, memory_budget_mb), _TorchScorer
    window_tables = [_axis_sample_coordinates(n, settings, False, device) for n in spatial]
    candidate_tables = [_axis_sample_coordinates(n, settings, True, device) for n in spatial]
    return scorer_class(source, moving, spatial, window_tables, candidate_tables, settings), chunk_voxels


@contextlib.contextmanager
def _float32_scoring(device: torch.device):
    """float32 throughout, also inside a caller's autocast (a training step): bfloat16 joints would move the maps by
    ~5e-3 and the chosen displacements at ~2 % of voxels, so training and sampling would see different conditions.

    On the CPU, denormal floats (below 1.2e-38: kernel products of a dark background) are flushed to zero while the
    map is computed: they cost the entropy pass about a third of its time (translation of the demo volume 2.8 ->
    2.3 s, output unchanged); the caller's setting is restored afterwards.
    """
    with torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else contextlib.nullcontext():
        switched = device.type == "cpu" and not _flushing_denormals() and torch.set_flush_denormal(True)
        try:
            yield
        finally:
            if switched:
                torch.set_flush_denormal(False)


def _flushing_denormals() -> bool:
    """Whether CPU float arithmetic flushes denormals now (torch can set the mode but not report it)."""
    return float(torch.tensor([1e-30]) * torch.tensor([1e-10])) == 0.0


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
    if isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float)) \
            or not 0 < memory_budget_mb < math.inf:
        raise BadInputError(f"memory_budget_mb must be a positive, finite number of MB; got {memory_budget_mb!r}.")
    reporter = as_reporter(reporter)
    batch, spatial, device = source.shape[0], tuple(source.shape[2:]), source.device
    backend = _resolve_backend(backend, device)
    total_voxels = batch * math.prod(spatial)
    displacements = candidate_displacements(ndim, settings)
    try:
        with torch.no_grad(), _float32_scoring(device):  # no gradient flows through the map (as released)
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
    except (RuntimeError, MemoryError) as error:
        if not is_out_of_memory(error):
            raise
        raise OutOfMemoryError(
            f"LMI map of {batch}×{spatial} ran out of memory on {device} with memory_budget_mb={memory_budget_mb}; "
            "lower memory_budget_mb (smaller chunks) or free device memory."
        ) from error
    offsets = offsets_from_candidates(best_candidate.view(batch, *spatial), displacements)
    return lmi.view(batch, 1, *spatial), offsets
