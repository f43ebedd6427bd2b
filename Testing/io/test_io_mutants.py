"""Volume I/O behaviour that no other test pinned down (found by mutation testing)."""

from __future__ import annotations

import locale

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import load_volume, save_volume
from medgen_testing import oblique_affine


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
@pytest.mark.parametrize("low, high", [(0, 300), (-5, 3), (0, 70000)])
def test_label_maps_beyond_eight_bits_round_trip_exactly(tmp_path, suffix, low, high):
    """Labels are stored in the smallest integer type that holds them: ids above 255 (e.g. TotalSegmentator-style
    or FreeSurfer lookup ids) or below 0 must not wrap."""
    labels = torch.randint(low, high + 1, (1, 6, 5, 4), generator=torch.Generator().manual_seed(0))
    labels.view(-1)[:2] = torch.tensor([low, high])
    volume = MetaTensor(labels, affine=torch.from_numpy(oblique_affine()))
    loaded = load_volume(save_volume(volume, tmp_path / f"labels{suffix}", label=True), label=True)
    assert torch.equal(loaded.as_tensor(), labels)


@pytest.fixture
def process_locale():
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder, slices: int, sideways_mm_per_slice: float) -> None:
    """An MR series of 2 mm slices, each shifted ``sideways_mm_per_slice`` along y (a gantry tilt)."""
    series = sitk.GetImageFromArray(np.zeros((slices, 8, 9), np.int16))
    series.SetSpacing((0.8, 0.8, 2.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(slices):
        image = series[:, :, k]
        origin = np.add(series.TransformIndexToPhysicalPoint((0, 0, k)), (0.0, sideways_mm_per_slice * k, 0.0))
        for tag, value in (("0020|000e", "1.2.826.0.1.3680043.2.1125.9.1"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.9.2"),
                           ("0020|0032", "\\".join(f"{v:.4f}" for v in origin)), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(k + 1)), ("0008|0060", "MR"), ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.0")):
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(image)


def test_a_slight_gantry_tilt_is_refused_too(tmp_path, process_locale):
    """A 3-degree tilt (0.1 mm sideways per 2 mm slice) misplaces far slices by millimetres: refused even on a short
    series, where it adds up to only 0.4 mm."""
    _write_series(tmp_path, 5, 0.1)
    with pytest.raises(BadInputError, match="sheared"):
        load_volume(tmp_path)
