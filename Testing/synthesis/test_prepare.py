"""Training-pair preparation: grid, label remapping with names, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medgen_testing import stored_reversed
from monai.data import MetaTensor

from medgen.errors import BadInputError, GeometryMismatchError
from medgen.io import axis_codes, save_volume
from medgen.labels import LabelInfo
from medgen.progress import CallbackReporter
from medgen.synthesis.prepare import check_common_grid, find_nnunet_pairs, load_pairs_from_folder, prepare_pairs


def _pair(affine, shape=(20, 18, 14), values=(3, 7)):
    image = MetaTensor(torch.rand(1, *shape) * 500, affine=torch.from_numpy(affine))
    label = torch.zeros(1, *shape, dtype=torch.int64)
    label[0, 2:8, 2:8, 2:6] = values[0]
    label[0, 10:16, 8:14, 6:12] = values[1]
    return image, MetaTensor(label, affine=torch.from_numpy(affine))


def test_pairs_are_resampled_to_one_grid_with_labels_remapped_and_named(oblique):
    image, label = _pair(oblique)
    labels = [LabelInfo("liver", 3, (1, 0, 0)), LabelInfo("spleen", 7, (0, 1, 0))]
    prepared, new_labels = prepare_pairs([("a", image, label)], shape=(16, 16, 16), spacing_mm=(1.0, 1.0, 1.0), labels=labels)
    pair = prepared[0]
    assert pair.image.shape == pair.label.shape == (1, 16, 16, 16)
    assert 0.0 <= float(pair.image.min()) and float(pair.image.max()) <= 1.0
    assert set(torch.unique(pair.label).tolist()) <= {0, 1, 2}
    assert [(label.name, label.value) for label in new_labels] == [("liver", 1), ("spleen", 2)]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(pair.label.affine)[:3, :3], axis=0), [1, 1, 1], atol=1e-5)
    assert torch.allclose(pair.image.affine, pair.label.affine)


@pytest.mark.parametrize("axis", [0, 2])
def test_a_scan_stored_in_another_axis_order_is_learned_as_the_same_tensors(oblique, axis):
    """The same scan as a NIfTI and, say, an LPS NRRD: training on storage order would learn mirrored anatomy."""
    image, label = _pair(oblique)
    kept, _ = prepare_pairs([("a", image, label)], shape=(16, 16, 16))
    turned, _ = prepare_pairs([("b", stored_reversed(image, axis), stored_reversed(label, axis))], shape=(16, 16, 16))
    assert torch.equal(turned[0].image.as_tensor(), kept[0].image.as_tensor())
    assert torch.equal(turned[0].label.as_tensor(), kept[0].label.as_tensor())
    assert torch.allclose(turned[0].image.affine, kept[0].image.affine, atol=1e-9)
    assert axis_codes(kept[0].image.affine) == "RAS"


def test_each_label_value_becomes_the_index_of_its_own_name(oblique):
    """Values 3 (liver) and 7 (spleen) become 1 and 2 voxel for voxel, in the order of the names returned: a
    model trained on swapped values would draw the liver where a mask asks for the spleen. The shape is the
    input's and no spacing is given, so nothing but the remapping touches the label map."""
    image, label = _pair(oblique)
    labels = [LabelInfo("spleen", 7, (0, 1, 0)), LabelInfo("liver", 3, (1, 0, 0))]
    prepared, new_labels = prepare_pairs([("a", image, label)], shape=(20, 18, 14), labels=labels)
    new_value = {info.name: info.value for info in new_labels}
    assert new_value == {"liver": 1, "spleen": 2}
    expected = torch.zeros_like(label.as_tensor())
    expected[label.as_tensor() == 3] = new_value["liver"]
    expected[label.as_tensor() == 7] = new_value["spleen"]
    assert torch.equal(prepared[0].label.as_tensor(), expected)


def test_labels_are_resampled_by_nearest_neighbour_voxel_for_voxel(oblique):
    """Resampling 0.8×0.9×2.5 mm to 0.7×0.7×1.1 mm must pick each new voxel's label from one source voxel: a
    blend rounded to a whole number would put 3s (liver) on the rim of the 7 (spleen) and 0-to-7 steps. The
    expected map comes from MONAI's nearest ``Spacing`` on the label alone, then the same centre crop/pad."""
    from monai.transforms import ResizeWithPadOrCrop, Spacing

    image, label = _pair(oblique)
    spacing, shape = (0.7, 0.7, 1.1), (24, 24, 32)
    prepared, _ = prepare_pairs([("a", image, label)], shape=shape, spacing_mm=spacing)
    nearest = ResizeWithPadOrCrop(shape)(Spacing(pixdim=spacing, mode="nearest")(label.float())).as_tensor().round().long()
    expected = torch.zeros_like(nearest)
    expected[nearest == 3], expected[nearest == 7] = 1, 2
    assert int((expected == 1).sum()) > 0 and int((expected == 2).sum()) > 0
    assert torch.equal(prepared[0].label.as_tensor(), expected)


def test_nearest_neighbour_keeps_labels_integer_and_never_invents_values(oblique):
    image, label = _pair(oblique)
    prepared, _ = prepare_pairs([("a", image, label)], shape=(24, 24, 24), spacing_mm=(0.7, 0.7, 1.9))
    assert set(torch.unique(prepared[0].label).tolist()) == {0, 1, 2}


def test_a_crop_that_cuts_labels_off_is_reported_and_a_coarser_spacing_keeps_them(oblique):
    image, label = _pair(oblique)  # 20×18×14 voxels of 0.8×0.9×2.5 mm, organs near two corners
    warnings = []
    reporter = CallbackReporter(lambda event: warnings.append(event["message"]) if "cropping" in event.get("message", "") else None)
    prepare_pairs([("a", image, label)], shape=(8, 8, 8), reporter=reporter)
    assert len(warnings) == 1 and "Case 'a': cropping its (20, 18, 14) voxels of [0.8, 0.9, 2.5] mm" in warnings[0]
    assert "cut off" in warnings[0] and "(--spacing-mm)" in warnings[0]
    warnings.clear()
    prepared, _ = prepare_pairs([("a", image, label)], shape=(8, 8, 8), spacing_mm=(3.0, 3.0, 5.0), reporter=reporter)
    assert warnings == [] and set(torch.unique(prepared[0].label).tolist()) == {0, 1, 2}


def test_unnamed_label_values_are_refused_when_names_are_given(oblique):
    image, label = _pair(oblique)
    with pytest.raises(BadInputError, match=r"values \[7\]"):
        prepare_pairs([("a", image, label)], shape=(16, 16, 16), labels=[LabelInfo("liver", 3, (1, 0, 0))])


def test_constant_image_is_refused_naming_its_case(oblique):
    image, label = _pair(oblique)
    flat = MetaTensor(torch.full_like(image.as_tensor(), 7.0), affine=image.affine)
    with pytest.raises(BadInputError, match=r"The image of case 'flat' is constant \(every voxel 7\)"):
        prepare_pairs([("a", image, label), ("flat", flat, label)], shape=(16, 16, 16))


def test_multi_component_images_are_refused_naming_the_case(oblique):
    image, label = _pair(oblique)
    rgb = MetaTensor(image.as_tensor().repeat(3, 1, 1, 1), affine=image.affine)
    with pytest.raises(BadInputError, match=r"Case 'vec' has an image of 3 and a label map of 1 component"):
        prepare_pairs([("vec", rgb, label)], shape=(16, 16, 16))


def test_cases_of_other_spacings_kept_as_they_are_are_a_warning(oblique):
    fine = _pair(oblique)
    thick_affine = oblique.copy()
    thick_affine[:3, 2] *= 2.0  # twice the slice spacing
    thick = _pair(thick_affine)
    logs = []
    reporter = CallbackReporter(lambda event: logs.append(event.get("message", "")))
    prepare_pairs([("fine", *fine), ("thick", *thick)], shape=(16, 16, 16), reporter=reporter)
    assert any("spacings differ" in message and "case 'fine''s spacing" in message for message in logs)
    logs.clear()
    prepare_pairs([("fine", *fine), ("thick", *thick)], shape=(16, 16, 16), spacing_mm=(1.0, 1.0, 1.0), reporter=reporter)
    assert not any("spacings differ" in message for message in logs)  # resampled to one spacing


def test_grid_the_vae_and_latent_unet_cannot_divide_is_refused_up_front(oblique):
    image, label = _pair(oblique, shape=(24, 24, 16))
    prepared, _ = prepare_pairs([("a", image, label)], shape=(24, 24, 16))
    assert check_common_grid(prepared, 8, 1) == (24, 24, 16)
    with pytest.raises(BadInputError, match=r"divisible by 16: the VAE downsamples 8x and the latent UNet halves 1x more. "
                                            r"Use e.g. \(32, 32, 16\)"):
        check_common_grid(prepared, 8, 2)


def test_pair_with_different_grids_is_refused(oblique):
    image, label = _pair(oblique)
    with pytest.raises(GeometryMismatchError, match="a image and a label"):
        prepare_pairs([("a", image, MetaTensor(label[:, :10].as_tensor(), affine=label.affine))], shape=(16, 16, 16))


def test_nnunet_folder_discovery(tmp_path, oblique):
    image, label = _pair(oblique)
    save_volume(image, tmp_path / "imagesTr" / "case1_0000.nii.gz")
    save_volume(label, tmp_path / "labelsTr" / "case1.nii.gz", label=True)
    assert [case for case, _, _ in find_nnunet_pairs(tmp_path)] == ["case1"]
    loaded = load_pairs_from_folder(tmp_path)
    assert loaded[0][2].dtype == torch.int64
    save_volume(image, tmp_path / "imagesTr" / "case2_0000.nii.gz")
    with pytest.raises(BadInputError, match="no label map case2.nii.gz"):
        find_nnunet_pairs(tmp_path)
    (tmp_path / "imagesTr" / "case2_0000.nii.gz").unlink()
    save_volume(image, tmp_path / "imagesTr" / "case1_0001.nii.gz")  # a second channel would be dropped silently
    with pytest.raises(BadInputError, match="Case case1 has a second channel \\(case1_0001.nii.gz\\)"):
        find_nnunet_pairs(tmp_path)
    save_volume(image, tmp_path / "imagesTr" / "case1_0001_0000.nii.gz")  # it was the label of a case "case1_0001"
    save_volume(label, tmp_path / "labelsTr" / "case1_0001.nii.gz", label=True)
    assert [case for case, _, _ in find_nnunet_pairs(tmp_path)] == ["case1", "case1_0001"]


def test_padding_is_background_whatever_the_raw_units_and_negative_labels_are_refused(oblique):
    image, label = _pair(oblique)
    ct = MetaTensor(image.as_tensor() - 1000.0, affine=image.affine)  # HU-like: air far below 0
    prepared, _ = prepare_pairs([("ct", ct, label)], shape=(24, 24, 20))  # 20×18×14 padded on every axis
    padded = prepared[0].image[0]
    assert float(padded[:, :, :3].abs().max()) == 0.0 and float(padded[:, :3].abs().max()) == 0.0
    negative = MetaTensor(label.as_tensor() * -1, affine=label.affine)
    with pytest.raises(BadInputError, match=r"negative values \[-7, -3\]"):
        prepare_pairs([("a", image, negative)], shape=(16, 16, 16))
