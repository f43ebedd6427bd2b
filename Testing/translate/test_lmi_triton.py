"""The fused Triton LMI kernel against the PyTorch operator, and the backend choice.

The kernel runs on CUDA when there is a GPU and otherwise under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set before the kernel module is imported). Without the triton package the
kernel tests are skipped; the backend-choice tests run everywhere.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

import pytest
import torch

from medgen.errors import BadInputError
from medgen.progress import CallbackReporter
from medgen.translate import lmi
from medgen.translate.lmi import lmi_map, triton_chunk_voxels
from medgen.translate.lmi_core import LmiSettings

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def triton_kernel():
    """The kernel module, compiled for CUDA or interpreted on the CPU (conftest sets TRITON_INTERPRET=1
    before anything imports triton); skips when triton is missing."""
    if not lmi.triton_available():
        pytest.skip(f"needs triton >= {lmi.MIN_TRITON_VERSION}")
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported without its CPU interpreter and there is no GPU")
    return importlib.import_module("medgen.translate.lmi_triton")


def _pair(shape: tuple[int, ...], moving_kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(shape))
    source = torch.rand(shape, generator=generator)
    if moving_kind == "noisy":  # a diffusion-like sample, partly outside [0, 1]
        moving = 0.7 * source + 0.3 * torch.randn(shape, generator=generator)
    else:  # far out of range in one item: compat's NMI = 2 artefact (quirk Q2)
        moving = torch.rand(shape, generator=generator)
        moving[0] += 3.0
    return source.to(DEVICE), moving.to(DEVICE)


@pytest.mark.parametrize(
    "shape, compat, normalize, moving_kind",
    [
        ((2, 1, 4, 5), False, True, "noisy"),
        ((2, 1, 4, 5), True, True, "out_of_range"),
        ((1, 1, 3, 3, 2), False, False, "noisy"),
        ((2, 1, 2, 3, 2), True, True, "noisy"),
    ],
)
def test_triton_kernel_matches_torch_operator(triton_kernel, shape, compat, normalize, moving_kind):
    source, moving = _pair(shape, moving_kind)
    options = dict(compat=compat, normalize=normalize)
    torch_lmi, torch_offsets = lmi_map(source, moving, backend="torch", **options)
    triton_lmi, triton_offsets = lmi_map(source, moving, backend="triton", **options)
    assert triton_lmi.shape == torch_lmi.shape and triton_offsets.shape == torch_offsets.shape
    assert (triton_lmi - torch_lmi).abs().max() < 1e-5
    if compat and moving_kind == "out_of_range":
        assert (triton_lmi[0] == 2.0).any()  # the released artefact is reproduced, not cleaned up
    # float32 summation order differs, so only near-ties may pick another candidate
    assert (triton_offsets != torch_offsets).any(dim=1).float().mean() <= 0.02


@pytest.mark.parametrize(
    "shape, compat, candidate_block",
    [((2, 1, 4, 5), True, 8), ((1, 1, 3, 4, 3), False, 4), ((2, 1, 2, 3, 2), True, 2)],
)
def test_candidate_blocks_give_the_same_map(triton_kernel, monkeypatch, shape, compat, candidate_block):
    """Blocks of 2, 4 or 8 candidates per step (masked tail: 9 and 27 are not multiples) score like one at a time."""
    source, moving = _pair(shape, "out_of_range" if compat else "noisy")
    single = lmi_map(source, moving, backend="triton", compat=compat)
    monkeypatch.setattr(triton_kernel, "CANDIDATE_BLOCK", candidate_block)
    blocked = lmi_map(source, moving, backend="triton", compat=compat)
    assert (blocked[0] - single[0]).abs().max() < 1e-6
    assert (blocked[1] != single[1]).any(dim=1).float().mean() <= 0.02


def test_triton_chunks_give_the_same_map(triton_kernel):
    source, moving = _pair((1, 1, 9, 9), "noisy")
    budget_mb = 32.008  # the fixed 32 MiB workspace plus room for ~70 of the 81 voxels → two chunks
    assert triton_chunk_voxels(1, (9, 9), LmiSettings(), budget_mb) == 41  # two equal chunks
    events = []
    chunked = lmi_map(
        source, moving, backend="triton", memory_budget_mb=budget_mb, reporter=CallbackReporter(on_event=events.append)
    )
    whole = lmi_map(source, moving, backend="torch")
    assert len(events) == 2
    assert (chunked[0] - whole[0]).abs().max() < 1e-5
    assert (chunked[1] != whole[1]).any(dim=1).float().mean() <= 0.02


def test_auto_backend_uses_torch_on_cpu():
    assert lmi._resolve_backend("auto", torch.device("cpu")) == "torch"


def test_unknown_backend_and_missing_triton_are_clear_errors(monkeypatch):
    volume = torch.rand(1, 1, 4, 4)
    with pytest.raises(BadInputError, match="backend"):
        lmi_map(volume, volume, backend="cuda")
    monkeypatch.setattr(lmi, "triton_available", lambda: False)
    with pytest.raises(BadInputError, match="triton"):
        lmi_map(volume, volume, backend="triton")
    assert lmi._resolve_backend("auto", torch.device("cuda")) == "torch"  # no Triton: PyTorch on the GPU


@pytest.mark.parametrize("installed", [None, "3.3.1", "3.0.0+git1234"])
def test_a_missing_or_too_old_triton_leaves_the_kernel_unused(monkeypatch, installed):
    """An older Triton than the kernel was tested with (torch 2.4 ships 3.0, which cannot compile it): "auto" then
    takes the PyTorch operator on the GPU, and asking for the kernel names the version found."""
    import types

    monkeypatch.setitem(sys.modules, "triton", None if installed is None else types.SimpleNamespace(__version__=installed))
    assert not lmi.triton_available()
    assert lmi._resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(BadInputError, match=f"needs triton >= 3.4 \\(found: {re.escape(installed or 'not installed')};"):
        lmi._resolve_backend("triton", torch.device("cuda"))


def test_triton_budget_too_small_is_a_clear_error():
    with pytest.raises(BadInputError, match="memory_budget_mb"):
        triton_chunk_voxels(1, (64, 64, 64), LmiSettings(), 1.0)
