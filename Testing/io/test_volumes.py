"""medgen.io: exact geometry round trips through real readers, and clear errors for bad files."""

from __future__ import annotations

import locale

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError, GeometryMismatchError
from medgen.io import check_same_geometry, load_volume, save_volume
from medgen_testing import oblique_affine

# NIfTI stores geometry as float32; NRRD and MetaImage keep float64.
TOLERANCE = {".nii": 1e-5, ".nii.gz": 1e-5, ".nrrd": 1e-9, ".mha": 1e-9}


def _volume(oblique, shape=(12, 10, 8), label=False):
    data = torch.randint(0, 4, (1, *shape)) if label else torch.rand(1, *shape)
    return MetaTensor(data, affine=torch.from_numpy(oblique))


@pytest.mark.parametrize("suffix", list(TOLERANCE))
def test_image_round_trip_keeps_oblique_geometry_and_values(tmp_path, oblique, suffix):
    volume = _volume(oblique)
    path = save_volume(volume, tmp_path / f"image{suffix}")
    loaded = load_volume(path)
    assert loaded.shape == volume.shape and loaded.dtype == torch.float32
    assert torch.equal(loaded.as_tensor(), volume.as_tensor())
    np.testing.assert_allclose(np.asarray(loaded.affine), oblique, atol=TOLERANCE[suffix])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_label_round_trip_stays_integer(tmp_path, oblique, suffix):
    labels = _volume(oblique, label=True)
    loaded = load_volume(save_volume(labels, tmp_path / f"label{suffix}", label=True), label=True)
    assert loaded.dtype == torch.int64
    assert torch.equal(loaded.as_tensor(), labels.as_tensor())
    assert sitk.ReadImage(str(tmp_path / f"label{suffix}")).GetPixelID() == sitk.sitkUInt8


def test_reader_agrees_with_simpleitk_lps_geometry(tmp_path):
    """A file written by SimpleITK (LPS) gives the RAS affine with x and y negated, axes I, J, K."""
    array_kji = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    image = sitk.GetImageFromArray(array_kji)
    image.SetSpacing((0.5, 0.7, 3.0))
    image.SetOrigin((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "lps.nrrd"))
    loaded = load_volume(tmp_path / "lps.nrrd")
    assert loaded.shape == (1, 6, 5, 4)
    assert float(loaded[0, 5, 4, 3]) == float(array_kji[3, 4, 5])
    np.testing.assert_allclose(np.asarray(loaded.affine), [[-0.5, 0, 0, -1], [0, -0.7, 0, -2], [0, 0, 3, 3], [0, 0, 0, 1]])


@pytest.fixture
def process_locale():
    """The process locale as it was before the test, restored after it (so later tests that decode subprocess
    output as UTF-8 are not run in the "C" locale)."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


def _nifti_cases(oblique):
    """NIfTI files nibabel writes in ways MedGen's own writer never does."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    scaled = nib.Nifti1Image(rng.integers(-100, 100, (6, 8, 9)).astype(np.int16), oblique)
    scaled.header.set_slope_inter(0.5, 10.0)
    qform_only = nib.Nifti1Image(rng.random((5, 6, 7)).astype(np.float32), None)
    qform_only.set_qform(oblique, code=1)
    qform_only.set_sform(None, code=0)
    vector = nib.Nifti1Image(rng.random((5, 6, 7, 1, 3)).astype(np.float32), oblique)
    vector.header.set_intent("vector")
    return {"scaled int16": scaled, "qform only": qform_only, "vector": vector,
            "big-endian": nib.Nifti1Image(rng.random((4, 5, 6)).astype(">f4"), oblique)}


@pytest.mark.parametrize("case", ["scaled int16", "qform only", "vector", "big-endian"])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_voxels_from_nibabel_and_geometry_from_the_header_match_simpleitk_reading_it_whole(tmp_path, oblique, case, suffix):
    import nibabel as nib

    path = tmp_path / f"case{suffix}"
    nib.save(_nifti_cases(oblique)[case], path)
    loaded = load_volume(path)
    image = sitk.ReadImage(str(path))
    expected = sitk.GetArrayFromImage(image)
    expected = (expected[..., None] if expected.ndim == 3 else expected).T  # (C, I, J, K)
    assert loaded.is_contiguous() and tuple(loaded.shape) == expected.shape
    np.testing.assert_allclose(loaded.numpy(), expected, rtol=0, atol=1e-6)
    direction = np.asarray(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    np.testing.assert_array_equal(loaded.affine.numpy()[:3, :3], np.diag([-1.0, -1.0, 1.0]) @ direction)
    np.testing.assert_array_equal(loaded.affine.numpy()[:3, 3], np.array(image.GetOrigin()) * [-1, -1, 1])


def _write_dicom_series(folder, array_kji, tilt_shift_mm=0.0):
    """One MR series of ``array_kji`` (K, J, I) slices of 0.8 x 0.8 x 2.0 mm, one file per slice; each slice
    ``tilt_shift_mm`` further along y than the last (a gantry-tilted CT's sheared positions)."""
    series = sitk.GetImageFromArray(array_kji)
    series.SetSpacing((0.8, 0.8, 2.0))
    series.SetOrigin((-5.0, 7.0, 11.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array_kji.shape[0]):
        slice_image = series[:, :, k]
        origin = np.add(series.TransformIndexToPhysicalPoint((0, 0, k)), (0.0, tilt_shift_mm * k, 0.0))
        for tag, value in (
            ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1.2"),
            ("0020|0032", "\\".join(str(v) for v in origin)), ("0020|0037", "1\\0\\0\\0\\1\\0"),
            ("0020|0013", str(k + 1)), ("0008|0060", "MR"), ("0028|0030", "0.8\\0.8"), ("0018|0050", "2.0"),
        ):
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_folder_is_read_with_its_geometry(tmp_path, process_locale):
    array_kji = (np.arange(3 * 8 * 9).reshape(3, 8, 9) % 200).astype(np.int16)
    _write_dicom_series(tmp_path, array_kji)
    # GDCM's writer above leaves the process in the "C" locale (the fixture restores it); the reader keeps the caller's
    try:
        locale.setlocale(locale.LC_ALL, "C.UTF-8")
    except locale.Error:
        pytest.skip("no C.UTF-8 locale on this machine")
    loaded = load_volume(tmp_path)
    assert locale.setlocale(locale.LC_ALL) == "C.UTF-8" and locale.getpreferredencoding(False) == "UTF-8"
    assert loaded.shape == (1, 9, 8, 3)
    assert torch.equal(loaded[0].long(), torch.from_numpy(array_kji.transpose(2, 1, 0)).long())
    np.testing.assert_allclose(np.linalg.norm(np.asarray(loaded.affine)[:3, :3], axis=0), [0.8, 0.8, 2.0], atol=1e-4)
    np.testing.assert_allclose(np.asarray(loaded.affine)[:3, 3], [5.0, -7.0, 11.0], atol=1e-4)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        load_volume(tmp_path / "nope.nii.gz")


def test_unsupported_extension_is_a_clear_error(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"\x89PNG")
    with pytest.raises(BadInputError, match="unsupported file type"):
        load_volume(tmp_path / "scan.png")


def test_corrupted_file_is_a_clear_error(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a gzip stream")
    with pytest.raises(BadInputError, match="unreadable or corrupted"):
        load_volume(tmp_path / "broken.nii.gz")


def test_2d_image_is_refused_where_3d_is_needed(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.float32)), str(tmp_path / "slice.nrrd"))
    with pytest.raises(BadInputError, match="3D volume is needed"):
        load_volume(tmp_path / "slice.nrrd")


def test_single_slice_volume_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 6, 5), np.float32)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(BadInputError, match="3D volume"):
        load_volume(tmp_path / "flat.nrrd")


def test_values_beyond_the_computing_range_are_named_not_called_nan(tmp_path):
    huge = np.full((6, 6, 6), 1e39, np.float64)
    sitk.WriteImage(sitk.GetImageFromArray(huge), str(tmp_path / "huge.nrrd"))
    with pytest.raises(BadInputError, match="huge.nrrd holds values up to 1e\\+39, beyond what MedGen computes with \\(float32\\)"):
        load_volume(tmp_path / "huge.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.full((6, 6, 6), 3e19)), str(tmp_path / "labels.nrrd"))
    with pytest.raises(BadInputError, match="int64 labels"):
        load_volume(tmp_path / "labels.nrrd", label=True)


def test_a_sheared_grid_is_refused_on_reading_and_saving(tmp_path, oblique):
    """NIfTI cannot store a sheared grid: ITK would coerce the outputs' axes, so they would not overlay the input."""
    image = sitk.GetImageFromArray(np.zeros((6, 6, 6), np.float32))
    image.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "sheared.mha"))
    with pytest.raises(BadInputError, match="sheared.mha has a sheared voxel grid"):
        load_volume(tmp_path / "sheared.mha")
    sheared = oblique.copy()
    sheared[:3, 1] += 0.3 * sheared[:3, 0]
    with pytest.raises(BadInputError, match="sheared voxel grid"):
        save_volume(MetaTensor(torch.rand(1, 6, 6, 6), affine=torch.from_numpy(sheared)), tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.parametrize("suffix", list(TOLERANCE))
@pytest.mark.parametrize("label", [False, True])
def test_nan_and_infinite_voxels_are_refused_in_every_format(tmp_path, suffix, label):
    # SimpleITK's NIfTI reader returns these voxels as 0: the NIfTI files are checked with nibabel too
    array = np.zeros((4, 5, 6), np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"nan{suffix}"))
    with pytest.raises(BadInputError, match="NaN"):
        load_volume(tmp_path / f"nan{suffix}", label=label)


def test_a_nifti_whose_sform_and_qform_disagree_is_read_with_a_warning(tmp_path, oblique, caplog):
    import nibabel as nib

    image = nib.Nifti1Image(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), None)
    image.set_qform(oblique, code=1)
    shifted = oblique.copy()
    shifted[:3, 3] += (3.0, 4.0, 0.0)  # 5 mm elsewhere
    image.set_sform(shifted, code=2)
    nib.save(image, tmp_path / "two_geometries.nii.gz")
    with caplog.at_level("WARNING", logger="medgen"):
        volume = load_volume(tmp_path / "two_geometries.nii.gz")
    (record,) = [record for record in caplog.records if "sform and qform disagree" in record.getMessage()]
    assert "5.00 mm apart" in record.getMessage() and "two_geometries.nii.gz" in record.getMessage()
    picked = "qform" if np.allclose(volume.affine.numpy(), oblique, atol=1e-3) else "sform"
    assert f"MedGen uses the {picked}" in record.getMessage()
    caplog.clear()
    image.set_sform(oblique, code=2)  # agreeing: no warning
    nib.save(image, tmp_path / "one_geometry.nii.gz")
    with caplog.at_level("WARNING", logger="medgen"):
        load_volume(tmp_path / "one_geometry.nii.gz")
    assert not caplog.records


def test_a_nifti_whose_pixdim_disagrees_with_its_only_sform_is_read_with_a_warning(tmp_path, oblique, caplog):
    """ITK takes such a file's spacing from pixdim, FSL, nibabel and MONAI from the sform."""
    import nibabel as nib

    image = nib.Nifti1Image(np.random.default_rng(0).random((5, 6, 7)).astype(np.float32), None)
    image.set_sform(oblique, code=1)
    image.set_qform(None, code=0)
    image.header["pixdim"][1:4] = 1.0  # the sform's spacing is 0.8, 0.9, 2.5 mm
    nib.save(image, tmp_path / "pixdim.nii.gz")
    with caplog.at_level("WARNING", logger="medgen"):
        load_volume(tmp_path / "pixdim.nii.gz")
    (record,) = [record for record in caplog.records if "pixdim spacing disagrees with its sform" in record.getMessage()]
    # the far corner: 1.5 mm x 6 slices on the last axis, less on the others
    assert "pixdim.nii.gz" in record.getMessage() and "corners up to 9.05 mm apart" in record.getMessage()
    caplog.clear()
    image.header["pixdim"][1:4] = (0.8, 0.9, 2.5)  # agreeing: no warning
    nib.save(image, tmp_path / "agreeing.nii.gz")
    with caplog.at_level("WARNING", logger="medgen"):
        load_volume(tmp_path / "agreeing.nii.gz")
    assert not caplog.records


def test_a_sheared_nifti_is_named_as_sheared_not_as_corrupted(tmp_path):
    import nibabel as nib

    sheared = np.array([[1.0, 0.15, 0.0, -20.0], [0.0, 1.0, 0.0, -30.0], [0.0, 0.0, 2.0, 10.0], [0.0, 0.0, 0.0, 1.0]])
    image = nib.Nifti1Image(np.zeros((5, 6, 7), np.float32), sheared)
    image.set_qform(None, code=0)
    nib.save(image, tmp_path / "sheared.nii.gz")
    with pytest.raises(BadInputError, match="sheared.nii.gz has a sheared voxel grid .*ITK cannot read it. Resample"):
        load_volume(tmp_path / "sheared.nii.gz")


def test_truncated_nifti_is_refused(tmp_path):
    # SimpleITK fills the missing end of a truncated .nii.gz with zeros instead of failing
    path = save_volume(MetaTensor(torch.rand(1, 24, 24, 24), affine=torch.eye(4, dtype=torch.float64)), tmp_path / "t1.nii.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(BadInputError, match="truncated or corrupted"):
        load_volume(path)


def test_float_label_map_with_fractions_is_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 5, 6), 0.5, np.float32)), str(tmp_path / "soft.nrrd"))
    with pytest.raises(BadInputError, match="non-integer"):
        load_volume(tmp_path / "soft.nrrd", label=True)


def test_geometry_mismatch_names_both_volumes(oblique):
    image = _volume(oblique)
    shifted = oblique.copy()
    shifted[:3, 3] += 1.0
    with pytest.raises(GeometryMismatchError, match="t1.nii.gz and seg.nii.gz .* origin"):
        check_same_geometry(image, _volume(shifted, label=True), "t1.nii.gz", "seg.nii.gz")
    check_same_geometry(image, _volume(oblique, label=True))


def test_a_label_with_other_axis_directions_is_a_geometry_mismatch():
    """Same shape, spacing and origin, but the label's first two axes run along each other's directions (a transposed
    label saved with the image's header values): only the direction check can tell, and it must, or the label
    would be read onto the image transposed."""
    affine = oblique_affine(spacing=(0.9, 0.9, 2.5))
    swapped = affine.copy()
    swapped[:3, [0, 1]] = affine[:3, [1, 0]]
    image, label = _volume(affine, shape=(10, 10, 8)), _volume(swapped, shape=(10, 10, 8), label=True)
    with pytest.raises(GeometryMismatchError, match=r"t1.nii.gz and seg.nii.gz .* differ in direction:"):
        check_same_geometry(image, label, "t1.nii.gz", "seg.nii.gz")


def test_failed_save_leaves_the_previous_file_intact(tmp_path, oblique):
    path = save_volume(_volume(oblique), tmp_path / "out.nii.gz")
    before = path.read_bytes()
    with pytest.raises(BadInputError):
        save_volume(torch.zeros(2, 2), path, affine=oblique)  # not (C, I, J, K)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_saved_files_get_the_usual_permissions_and_bad_saves_are_refused(tmp_path, oblique):
    import os

    from medgen.io.atomic import write_text_atomic

    mask = os.umask(0)
    os.umask(mask)
    volume = MetaTensor(torch.rand(1, 4, 4, 4), affine=torch.from_numpy(oblique))
    assert (save_volume(volume, tmp_path / "v.nii.gz").stat().st_mode & 0o777) == 0o666 & ~mask
    assert (write_text_atomic(tmp_path / "a.json", "{}").stat().st_mode & 0o777) == 0o666 & ~mask
    with pytest.raises(BadInputError, match="non-integer values"):
        save_volume(volume * 3, tmp_path / "l.nii.gz", label=True)
    with pytest.raises(BadInputError, match="detached header"):
        save_volume(volume, tmp_path / "v.mhd")


@pytest.mark.parametrize("name", ["OUT.MHA", "OUT.NII.GZ", "out.Nrrd", "OUT.NII"])
def test_upper_case_suffixes_save_and_load_like_lower_case_ones(tmp_path, oblique, name):
    volume = MetaTensor(torch.rand(1, 5, 4, 3), affine=torch.from_numpy(oblique))
    save_volume(volume * 0, tmp_path / name)  # a previous version, replaced whole by the next save
    loaded = load_volume(save_volume(volume, tmp_path / name))
    assert torch.allclose(loaded, volume) and np.allclose(np.asarray(loaded.affine), oblique, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_an_uncompressed_nifti_named_nii_gz_is_named_as_such(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "a.nii")
    (tmp_path / "a.nii").rename(tmp_path / "a.nii.gz")
    with pytest.raises(BadInputError, match="a.nii.gz is not gzip-compressed although its name ends in .gz .*rename it to a.nii"):
        load_volume(tmp_path / "a.nii.gz")


def test_a_nifti_write_cut_short_keeps_the_previous_file(tmp_path, oblique, monkeypatch):
    volume = MetaTensor(torch.rand(1, 8, 8, 8), affine=torch.from_numpy(oblique))
    for name in ("v.nii.gz", "v.nii"):
        previous = save_volume(volume, tmp_path / name).read_bytes()
        real_write = sitk.WriteImage

        def full_disk(image, path, useCompression=False):  # ITK prints the short write and returns normally
            real_write(image, path, useCompression=useCompression)
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])

        monkeypatch.setattr(sitk, "WriteImage", full_disk)
        with pytest.raises(OSError, match="cut short"):
            save_volume(volume * 2, tmp_path / name)
        monkeypatch.setattr(sitk, "WriteImage", real_write)
        assert (tmp_path / name).read_bytes() == previous
        assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []


def test_a_dicom_series_with_a_missing_slice_is_refused(tmp_path, process_locale):
    _write_dicom_series(tmp_path, (np.arange(5 * 8 * 9).reshape(5, 8, 9) % 200).astype(np.int16))
    assert load_volume(tmp_path).shape == (1, 9, 8, 5)
    (tmp_path / "slice002.dcm").unlink()
    with pytest.raises(BadInputError, match=r"unevenly spaced slices \(gaps 2 to 4 mm, typically 2 mm\)"):
        load_volume(tmp_path)


def test_a_gantry_tilted_dicom_series_is_refused_not_misplaced(tmp_path, process_locale):
    # evenly spaced along the normal, so only the sideways shift tells; ITK would take 2.5 mm slices and drop it
    _write_dicom_series(tmp_path, np.zeros((5, 8, 9), np.int16), tilt_shift_mm=1.5)
    with pytest.raises(BadInputError, match=r"sheared \(gantry tilt about 37 degrees\): its slices shift 6 mm sideways"):
        load_volume(tmp_path)


def test_volume_stems_keep_dots_before_the_suffix():
    from medgen.io import volume_stem

    assert volume_stem("/data/1.2.840.113619.2.55.nii.gz") == "1.2.840.113619.2.55"
    assert volume_stem("sub-01_ses-1.5T_T1w.NRRD") == "sub-01_ses-1.5T_T1w"
    assert volume_stem("/data/dicom.series.1") == "dicom.series.1"  # a DICOM folder: no suffix to strip
