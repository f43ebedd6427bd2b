"""Fused GPU kernel of the LMI map: one Triton program scores one voxel against every candidate.

Hand-written (no library has a local mutual-information kernel). The PyTorch operator in
:mod:`medgen.translate.lmi` materialises, per chunk voxel and candidate, the gathered n×K moving
windows and the K×K joint histogram in device memory and reads them back for the entropy: memory
traffic and many small kernels bound it (≈ 2.7× the unfold port at 64³ on an H100). Here every
joint lives in registers from its first sample to its entropy:

- the window samples are read from the two intensity volumes (plus one zero plane per axis) through
  the same per-axis coordinate tables as the PyTorch operator (so compat quirk Q1, compat zero
  padding and clean replicate padding are identical);
- the Gaussian kernel of each sample against the K bin centres is evaluated on the fly into an
  (n, K) tile, once for the source window and once per candidate window;
- the joint is one small matrix product Aᵀ·B (K×n by n×K, IEEE float32, no TF32);
- marginal and joint entropies and the (N)MI score are computed in the same program and only the
  score (4 bytes per voxel and candidate) is written.

With ``CANDIDATE_BLOCK`` = c > 1 a program scores c candidates per step: their moving tiles sit side by
side in one (n, c·K) operand, so the joint of all c is one (K×n)·(n×c·K) product and the loop runs C/c times
(larger tensor-core products, fewer loop steps; ``bench/bench_lmi.py --kernel-sweep`` measures the choices).

Memory is two padded float32 volumes plus a (N, C) score block per chunk. Values equal the PyTorch
operator's to float32 rounding (the summation order differs); the tests compare both, on the GPU
and, without one, under Triton's CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from medgen.translate.lmi_core import COMPAT_INTENSITY_SCALE, EPSILON, LmiSettings, bin_centres

#: warps per program: one (n, K) tile pair and a K×K joint fit one warp's registers; 1 warp ran fastest
#: at 128³ on an H100 (475 ms vs 707 ms with 2 and 1050 ms with 4, tf32x3)
NUM_WARPS = 1
#: candidates scored per loop step (a power of two; the last block is masked). 1 is the measured kernel above;
#: larger blocks are unmeasured on a GPU so far (interpreter-tested only)
CANDIDATE_BLOCK = 1
#: precision of the joint's matrix product. "tf32x3" (three TF32 tensor-core passes) matched IEEE float32 to
#: 1.5e-7 in NMI at 128³ on an H100 and ran 2-3× faster than "ieee"; plain "tf32" is off by 3.5e-4.
DOT_PRECISION = "tf32x3"


@triton.jit
def _histogram_entropy_bits(histogram, eps):
    """Entropy in bits of an unnormalised histogram (KP,); zero padding bins contribute nothing."""
    pdf = histogram / (tl.sum(histogram, 0) + eps)
    return -tl.sum(pdf * tl.log2(pdf + eps), 0)


@triton.jit
def _window_kernels(values, centres, valid, width):
    """exp(-½((v - c_k)/h)²) of window samples (NP,) against the bin centres (KP,) → (NP, KP).

    ``valid`` (NP, KP) zeroes padding samples (beyond p**ndim) and padding bins (beyond K).
    """
    residual = (values[:, None] - centres[None, :]) / width
    return tl.where(valid, tl.exp(-0.5 * residual * residual), 0.0)


@triton.jit
def _sample_offset(table_ptr, candidate, sample, position, length, stride, samples_on_axis, mask):
    """Flat offset along one axis of every window sample: table[candidate, sample, position] · stride."""
    index = (candidate * samples_on_axis + sample) * length + position
    return tl.load(table_ptr + index, mask=mask, other=0).to(tl.int64) * stride


@triton.jit
def _entr(joint):
    """-J·ln J elementwise, 0 where J = 0 (J ≥ 0)."""
    return tl.where(joint > 0.0, -joint * tl.log(tl.maximum(joint, 1e-38)), 0.0)


@triton.jit
def _mutual_information_score(entr_sum, mass, source_entropy, moving_entropy, eps, NORMALIZE: tl.constexpr):
    """(N)MI from the joint's Σ entr(J) and mass S = Σ J and the two marginal entropies (bits).

    -Σ (J/Z)·ln(J/Z) = (Σ entr(J) + S·ln Z)/Z with Z = S + ε (see lmi_core.joint_entropy_bits).
    """
    normaliser = mass + eps
    joint_entropy = (entr_sum + mass * tl.log(normaliser)) / (normaliser * 0.6931471805599453)
    mutual_information = source_entropy + moving_entropy - joint_entropy
    if NORMALIZE:
        return 2.0 * (mutual_information + eps) / (source_entropy + moving_entropy + eps)
    return mutual_information


@triton.jit
def _displacement_steps(candidate, Q1: tl.constexpr, Q2: tl.constexpr):
    """The per-axis displacement indices (q0, q1, q2) of a raster-ordered candidate index."""
    return candidate // (Q1 * Q2), (candidate // Q2) % Q1, candidate % Q2


@triton.jit
def _score_candidate(
    candidate, moving_ptr, base, candidate0_ptr, candidate1_ptr, candidate2_ptr, a0, a1, a2, i0, i1, i2,
    length0, length1, length2, stride0, stride1, stride2, sample_mask, centres, valid, width, eps,
    source_kernels_t, source_sample_sums, source_entropy, scores_row_ptr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT: tl.constexpr,
):
    """Score one candidate window of ``moving`` against the voxel's source window; stores scores_row[candidate]."""
    q0, q1, q2 = _displacement_steps(candidate, Q1, Q2)
    moving_offset = (
        _sample_offset(candidate0_ptr, q0, a0, i0, length0, stride0, P0, sample_mask)
        + _sample_offset(candidate1_ptr, q1, a1, i1, length1, stride1, P1, sample_mask)
        + _sample_offset(candidate2_ptr, q2, a2, i2, length2, stride2, P2, sample_mask)
    )
    moving_values = tl.load(moving_ptr + base + moving_offset, mask=sample_mask, other=0.0)
    moving_kernels = _window_kernels(moving_values, centres, valid, width)
    joint = tl.dot(source_kernels_t, moving_kernels, input_precision=DOT)  # (KP, KP)
    moving_entropy = _histogram_entropy_bits(tl.sum(moving_kernels, 0), eps)
    mass = tl.sum(source_sample_sums * tl.sum(moving_kernels, 1), 0)
    entr_sum = tl.sum(tl.sum(_entr(joint), 1), 0)
    score = _mutual_information_score(entr_sum, mass, source_entropy, moving_entropy, eps, NORMALIZE)
    tl.store(scores_row_ptr + candidate, score)


@triton.jit
def _score_candidate_block(
    block, moving_ptr, base, candidate0_ptr, candidate1_ptr, candidate2_ptr, a0, a1, a2, i0, i1, i2,
    length0, length1, length2, stride0, stride1, stride2, sample_mask, centres, bins, width, eps,
    source_kernels_t, source_sample_sums, source_entropy, scores_row_ptr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
    CANDIDATES: tl.constexpr, CB: tl.constexpr, NP: tl.constexpr, KP: tl.constexpr, BINS: tl.constexpr,
    NORMALIZE: tl.constexpr, DOT: tl.constexpr,
):
    """Score candidates block·CB … block·CB + CB - 1 (those < CANDIDATES) against the voxel's source window.

    The same arithmetic as :func:`_score_candidate`, on (NP, CB) sample tables, (NP, CB, KP) kernel tiles
    and one (KP, NP)·(NP, CB·KP) joint product whose column block j is candidate j's joint.
    """
    candidate = block * CB + tl.arange(0, CB)
    in_range = candidate < CANDIDATES
    q0, q1, q2 = _displacement_steps(candidate, Q1, Q2)
    mask = sample_mask[:, None] & in_range[None, :]
    moving_offset = (
        _sample_offset(candidate0_ptr, q0[None, :], a0[:, None], i0, length0, stride0, P0, mask)
        + _sample_offset(candidate1_ptr, q1[None, :], a1[:, None], i1, length1, stride1, P1, mask)
        + _sample_offset(candidate2_ptr, q2[None, :], a2[:, None], i2, length2, stride2, P2, mask)
    )
    moving_values = tl.load(moving_ptr + base + moving_offset, mask=mask, other=0.0)  # (NP, CB)
    residual = (moving_values[:, :, None] - centres[None, None, :]) / width
    valid = mask[:, :, None] & (bins < BINS)[None, None, :]
    moving_kernels = tl.where(valid, tl.exp(-0.5 * residual * residual), 0.0)  # (NP, CB, KP)
    joint = tl.dot(source_kernels_t, tl.reshape(moving_kernels, (NP, CB * KP)), input_precision=DOT)
    moving_histograms = tl.sum(moving_kernels, 0)  # (CB, KP)
    moving_pdf = moving_histograms / (tl.sum(moving_histograms, 1)[:, None] + eps)
    moving_entropy = -tl.sum(moving_pdf * tl.log2(moving_pdf + eps), 1)
    mass = tl.sum(source_sample_sums[:, None] * tl.sum(moving_kernels, 2), 0)  # (CB,)
    entr_sums = tl.sum(tl.reshape(tl.sum(_entr(joint), 0), (CB, KP)), 1)  # joint (KP, CB·KP) → (CB,)
    score = _mutual_information_score(entr_sums, mass, source_entropy, moving_entropy, eps, NORMALIZE)
    tl.store(scores_row_ptr + candidate, score, mask=in_range)


@triton.jit
def _candidate_scores_kernel(
    source_ptr, moving_ptr, centres_ptr,
    window0_ptr, window1_ptr, window2_ptr, candidate0_ptr, candidate1_ptr, candidate2_ptr,
    scores_ptr, voxel_start,
    length0, length1, length2, stride0, stride1, stride2, item_stride,
    width, eps,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr, NP: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr,
    CANDIDATES: tl.constexpr, BINS: tl.constexpr, KP: tl.constexpr, NORMALIZE: tl.constexpr,
    DOT: tl.constexpr, CB: tl.constexpr,
):
    """scores[v - voxel_start, c] of voxel v = voxel_start + program_id(0), for every candidate c.

    Axis tables (int32): window_d (1, P_d, L_d) and candidate_d (Q_d, P_d, L_d) give each sample's
    coordinate along axis d in the padded volume (index L_d = the zero plane). 2D inputs pass a
    dummy axis 0 with L = P = Q = 1 and stride 0. NP ≥ P0·P1·P2 and KP ≥ BINS are powers of two ≥ 16.
    """
    local = tl.program_id(0).to(tl.int64)
    voxel = voxel_start + local
    per_item = length0 * length1 * length2
    base = (voxel // per_item) * item_stride
    rest = voxel % per_item
    i0 = rest // (length1 * length2)
    i1 = (rest // length2) % length1
    i2 = rest % length2

    sample = tl.arange(0, NP)
    sample_mask = sample < P0 * P1 * P2
    a0 = sample // (P1 * P2)
    a1 = (sample // P2) % P1
    a2 = sample % P2
    bins = tl.arange(0, KP)
    centres = tl.load(centres_ptr + bins, mask=bins < BINS, other=0.0)
    valid = sample_mask[:, None] & (bins < BINS)[None, :]

    source_offset = (
        _sample_offset(window0_ptr, 0, a0, i0, length0, stride0, P0, sample_mask)
        + _sample_offset(window1_ptr, 0, a1, i1, length1, stride1, P1, sample_mask)
        + _sample_offset(window2_ptr, 0, a2, i2, length2, stride2, P2, sample_mask)
    )
    source_values = tl.load(source_ptr + base + source_offset, mask=sample_mask, other=0.0)
    source_kernels = _window_kernels(source_values, centres, valid, width)  # (NP, KP)
    source_entropy = _histogram_entropy_bits(tl.sum(source_kernels, 0), eps)
    source_sample_sums = tl.sum(source_kernels, 1)
    source_kernels_t = tl.trans(source_kernels)  # (KP, NP)

    # a dynamic loop: unrolling the 27 candidates compiled for a minute and ran 1.5× slower (H100)
    if CB == 1:
        for candidate in range(CANDIDATES):
            _score_candidate(
                candidate, moving_ptr, base, candidate0_ptr, candidate1_ptr, candidate2_ptr, a0, a1, a2, i0, i1, i2,
                length0, length1, length2, stride0, stride1, stride2, sample_mask, centres, valid, width, eps,
                source_kernels_t, source_sample_sums, source_entropy, scores_ptr + local * CANDIDATES,
                P0, P1, P2, Q1, Q2, NORMALIZE, DOT,
            )
    else:
        for block in range(tl.cdiv(CANDIDATES, CB)):
            _score_candidate_block(
                block, moving_ptr, base, candidate0_ptr, candidate1_ptr, candidate2_ptr, a0, a1, a2, i0, i1, i2,
                length0, length1, length2, stride0, stride1, stride2, sample_mask, centres, bins, width, eps,
                source_kernels_t, source_sample_sums, source_entropy, scores_ptr + local * CANDIDATES,
                P0, P1, P2, Q1, Q2, CANDIDATES, CB, NP, KP, BINS, NORMALIZE, DOT,
            )


def _axis_tables_3d(tables: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pad a 2D input's per-axis tables with a dummy leading axis (coordinate 0) and make them int32."""
    tables = [table.to(torch.int32).contiguous() for table in tables]
    if len(tables) == 2:
        tables.insert(0, torch.zeros((1, 1, 1), dtype=torch.int32, device=tables[0].device))
    return tables


def candidate_scores(
    source_units: torch.Tensor,
    moving_units: torch.Tensor,
    spatial: tuple[int, ...],
    window_tables: list[torch.Tensor],
    candidate_tables: list[torch.Tensor],
    settings: LmiSettings,
    voxel_start: int,
    voxel_count: int,
) -> torch.Tensor:
    """Scores of every candidate for a run of voxels, ``(voxel_count, C)`` float32.

    Args:
        source_units, moving_units: ``(B, *(L+1))`` float32, the volumes in kernel units with one
            zero plane appended per axis (contiguous).
        spatial: the unpadded spatial shape L (2 or 3 axes).
        window_tables: per axis ``(1, p, L)`` coordinates of the plain window
            (``lmi._axis_sample_coordinates(..., displaced=False)``).
        candidate_tables: per axis ``(Q, p, L)`` coordinates of the displaced windows.
        settings: the map's settings (bins, kernel width, normalisation, compat units).
        voxel_start, voxel_count: the flat voxel range (over batch and space) to score.
    """
    padded = tuple(n + 1 for n in spatial)
    strides = [math.prod(padded[axis + 1 :]) for axis in range(len(padded))]
    lengths = list(spatial)
    if len(spatial) == 2:
        lengths, strides = [1, *lengths], [0, *strides]
    windows = _axis_tables_3d(window_tables)
    candidates = _axis_tables_3d(candidate_tables)
    steps = [table.shape[0] for table in candidates]
    samples = [table.shape[1] for table in windows]
    n_candidates = math.prod(steps)
    device = source_units.device
    centres = bin_centres(settings, device).contiguous()
    width = settings.sigma * (COMPAT_INTENSITY_SCALE if settings.compat else 1.0)
    scores = torch.empty((voxel_count, n_candidates), dtype=torch.float32, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _candidate_scores_kernel[(voxel_count,)](
            source_units, moving_units, centres, *windows, *candidates, scores, voxel_start,
            *lengths, *strides, math.prod(padded), width, EPSILON,
            P0=samples[0], P1=samples[1], P2=samples[2], NP=max(16, triton.next_power_of_2(math.prod(samples))),
            Q1=steps[1], Q2=steps[2], CANDIDATES=n_candidates, BINS=settings.bins,
            KP=max(16, triton.next_power_of_2(settings.bins)), NORMALIZE=settings.normalize, DOT=DOT_PRECISION,
            CB=CANDIDATE_BLOCK, num_warps=NUM_WARPS,
        )
    return scores

