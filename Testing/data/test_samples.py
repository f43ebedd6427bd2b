"""Offline sample data from the nilearn wheel: real anatomy, derived labels, simulated contrast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medgen.errors import BadInputError
from medgen.io import check_same_geometry, load_volume
from medgen.labels import load_labels


@pytest.fixture(scope="module")
def tiny_case():
    from medgen.data.samples import load_sample_case

    return load_sample_case("tiny", seed=3)


def test_tiny_case_is_32_cubed_on_one_grid(tiny_case):
    for name in ("t1", "t2_simulated", "pd_simulated", "tissue_labels", "brain_mask"):
        volume = getattr(tiny_case, name)
        assert volume.shape == (1, 32, 32, 32)
        check_same_geometry(tiny_case.t1, volume, "t1", name)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(tiny_case.t1.affine)[:3, :3], axis=0), [6.0, 6.0, 6.0])


def test_tissue_labels_are_three_classes_inside_the_brain(tiny_case):
    labels = tiny_case.tissue_labels
    assert set(torch.unique(labels).tolist()) == {0, 1, 2, 3}
    assert torch.equal(labels > 0, tiny_case.brain_mask.bool())
    assert [label.name for label in tiny_case.labels] == ["CSF", "grey matter", "white matter"]


def test_simulated_t2_inverts_the_t1_contrast(tiny_case):
    """T1: WM brighter than GM; simulated T2: CSF > GM > WM (the ordering it was built with)."""
    labels = tiny_case.tissue_labels
    t1_mean = [float(tiny_case.t1[labels == v].mean()) for v in (1, 2, 3)]
    t2_mean = [float(tiny_case.t2_simulated[labels == v].mean()) for v in (1, 2, 3)]
    assert t1_mean[2] > t1_mean[1]
    assert t2_mean[0] > t2_mean[1] > t2_mean[2]
    assert 0.0 <= float(tiny_case.t2_simulated.min()) and float(tiny_case.t2_simulated.max()) <= 1.0


def test_simulated_contrast_is_deterministic_per_seed():
    from medgen.data.samples import load_sample_case

    a, b, c = (load_sample_case("tiny", seed=s).t2_simulated for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_written_case_reads_back_with_real_reader(tiny_case, tmp_path):
    from medgen.data.samples import write_sample_case

    paths = write_sample_case(tiny_case, tmp_path)
    labels = load_volume(paths["tissue_labels"], label=True)
    assert torch.equal(labels.as_tensor(), tiny_case.tissue_labels.as_tensor())
    check_same_geometry(load_volume(paths["t2_simulated"]), labels)
    assert [label.name for label in load_labels(paths["labels"])] == ["CSF", "grey matter", "white matter"]
    assert "SIMULATED" in (tmp_path / "README.txt").read_text()


def test_unknown_size_is_a_clear_error():
    from medgen.data.samples import load_sample_case

    with pytest.raises(BadInputError, match="Unknown sample size"):
        load_sample_case("huge")


def test_the_simulated_scalp_is_measured_in_millimetres():
    """The shell lies gap_mm to gap_mm + thickness_mm outside the brain in millimetres, whatever the voxel size: on
    2 mm voxels, a 4 mm gap and a 6 mm shell are voxels 3..5 beyond the brain's edge along an axis."""
    from monai.data import MetaTensor

    from medgen.data.samples import with_simulated_head

    brain = torch.zeros(1, 32, 8, 8)
    brain[0, :8] = 1  # the brain fills slices 0..7 along I
    two_mm = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    head = with_simulated_head(MetaTensor(torch.zeros(1, 32, 8, 8), affine=two_mm), MetaTensor(brain, affine=two_mm),
                               noise_std=0.0, gap_mm=4.0, thickness_mm=6.0)
    bright = (head[0, :, 4, 4] > 0.5).nonzero().flatten().tolist()
    assert bright == [10, 11, 12]  # 6, 8, 10 mm beyond the last brain slice (7); 4 mm (slice 9) is still the gap
