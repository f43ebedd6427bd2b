"""Load and save 3D volumes (NIfTI, NRRD, MetaImage, DICOM series) with exact geometry.

SimpleITK reads and writes every format here. It stores geometry in LPS; MedGen tensors use RAS,
so the affine is flipped on the way in and out (the only LPS<->RAS conversion in MedGen).
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io.atomic import atomic_output
from medgen.io.validation import check_finite, check_spatial_3d, holds_whole_numbers

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: headers whose voxels sit in a separate file: read, not written (an atomic write would name a temporary file)
DETACHED_SUFFIXES = (".nhdr", ".mhd")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: sideways drift of slice positions across a DICOM series above which it counts as sheared (gantry tilt); positions
#: written with two decimals drift up to about 0.01 mm by rounding alone, a real tilt by millimetres
TILT_TOLERANCE_MM = 0.05
SHEARED_GRID = "has a sheared voxel grid (its axes are not perpendicular)"
SHEARED_ADVICE = "Resample it onto an orthogonal grid first (e.g. Slicer's Resample Scalar Volume)."
#: ITK's reader per suffix, named because ITK's MetaImage reader does not recognise an upper-case ".MHA" itself
_IMAGE_IO = {".mha": "MetaImageIO", ".mhd": "MetaImageIO", ".nrrd": "NrrdImageIO", ".nhdr": "NrrdImageIO"}


def volume_suffix(path: str | os.PathLike) -> str:
    """The format suffix of ``path`` (``.nii.gz`` counts as one); ``""`` if unsupported."""
    name = Path(path).name.lower()
    for suffix in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return ""


def volume_stem(path: str | os.PathLike) -> str:
    """The file name without its volume suffix: ``1.2.840.5.nii.gz`` -> ``1.2.840.5`` (dots in DICOM UIDs and
    BIDS names are kept); a name without a supported suffix (a DICOM folder) is returned whole."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


def _check_readable_path(path: Path) -> None:
    if not path.exists():
        raise BadInputError(f"Volume file {path} does not exist. Check the path or pick another file.")
    if not path.is_dir() and not volume_suffix(path):
        raise BadInputError(
            f"{path.name} has an unsupported file type. Supported: {', '.join(SUPPORTED_SUFFIXES)} "
            "or a folder holding one DICOM series."
        )


def _unreadable(path: Path, error: Exception) -> BadInputError:
    if "orthonormal" in str(error):  # ITK refuses sheared direction cosines before reading any voxel
        return BadInputError(f"{path.name} {SHEARED_GRID}; ITK cannot read it. {SHEARED_ADVICE}")
    return BadInputError(f"Could not read {path}: the file is unreadable or corrupted ({_first_line(error)}).")


def _check_3d(geometry: sitk.Image | sitk.ImageFileReader, name: str) -> None:
    if geometry.GetDimension() != 3:
        raise BadInputError(
            f"{name} is {geometry.GetDimension()}D (size {geometry.GetSize()}) but a 3D volume is needed. "
            "Load a 3D scan (for a 4D series, extract one time point first)."
        )


def _read_sitk(path: Path, name: str) -> tuple[sitk.Image, np.ndarray]:
    """A volume file or DICOM folder read with SimpleITK: the image (geometry) and its voxels ``(C, I, J, K)``."""
    if path.is_dir():
        image = _read_dicom_series(path)
    else:
        try:
            image = sitk.ReadImage(str(path), imageIO=_IMAGE_IO.get(volume_suffix(path), ""))
        except RuntimeError as error:
            raise _unreadable(path, error) from error
    _check_3d(image, name)
    voxels_kji = sitk.GetArrayFromImage(image)  # (K, J, I[, C])
    if voxels_kji.ndim == 3:
        voxels_kji = voxels_kji[..., None]
    return image, voxels_kji.T  # (C, I, J, K)


def _read_nifti(path: Path, name: str) -> tuple[sitk.ImageFileReader, np.ndarray]:
    """A NIfTI file's geometry from SimpleITK's header reader and its voxels ``(C, I, J, K)`` from nibabel.

    Measured with SimpleITK 2.5.7 (ITK 5.4): its NIfTI reader returns NaN and infinite voxels as 0 and
    fills the missing end of a truncated ``.nii.gz`` with zeros, without an error, so neither can be seen
    in the array it returns. nibabel raises on the truncated stream and keeps non-finite values, so the
    voxels come from nibabel (decoded once: 0.15 s instead of 0.43 s with both readers on a 197x233x189
    float volume) and only the header from SimpleITK, which keeps one geometry rule (LPS) for every format.
    """
    import nibabel as nib

    header = sitk.ImageFileReader()
    header.SetFileName(str(path))
    try:
        header.ReadImageInformation()
    except RuntimeError as error:
        raise _unreadable(path, error) from error
    _check_3d(header, name)
    with path.open("rb") as stream:
        gzip_magic = stream.read(2) == b"\x1f\x8b"
    if path.name.lower().endswith(".gz") and not gzip_magic:
        raise BadInputError(f"{path} is not gzip-compressed although its name ends in .gz (ITK reads it, nibabel "
                            f"does not): rename it to {path.name[:-3]}.")
    try:
        nifti = nib.load(str(path))
        voxels = np.asanyarray(nifti.dataobj)
    except (EOFError, OSError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise BadInputError(
            f"Could not read {path}: the file is truncated or corrupted ({_first_line(error)}). Copy or export it again."
        ) from error
    _warn_about_disagreeing_nifti_geometry(nifti, header, name)
    if voxels.dtype.fields is not None:  # RGB NIfTI: a structured array; SimpleITK gives it as components
        return _read_sitk(path, name)
    shape = (*header.GetSize(), header.GetNumberOfComponents())
    if voxels.size != np.prod(shape):
        raise BadInputError(f"Could not read {path}: its header describes {shape} voxels x components but it holds "
                            f"an array of shape {voxels.shape}.")
    return header, np.moveaxis(voxels.reshape(shape), -1, 0)  # the reshape drops NIfTI's singleton 4th axis of vectors


def _warn_about_disagreeing_nifti_geometry(nifti, header: sitk.ImageFileReader, name: str) -> None:
    """Log a warning when ITK (so MedGen and Slicer) places a NIfTI file's voxels elsewhere (> 0.01 mm or 1e-4 in
    direction) than FSL, nibabel and MONAI's NIfTI reader, which take the sform:

    - the file sets both its sform and qform and they disagree (ITK takes one of them);
    - the file sets only its sform and its pixdim spacing disagrees with it (ITK takes pixdim's spacing).
    """
    sform_code, qform_code = int(nifti.header["sform_code"]), int(nifti.header["qform_code"])
    if sform_code <= 0:
        return
    sform, used = nifti.get_sform(), _affine_ras(header)
    if qform_code <= 0:
        if not np.allclose(used, sform, atol=1e-2, rtol=1e-4):
            corners = np.array([[i, j, k, 1.0] for i in (0, header.GetSize()[0] - 1) for j in (0, header.GetSize()[1] - 1)
                                for k in (0, header.GetSize()[2] - 1)])
            apart = float(np.linalg.norm((corners @ (used - sform).T)[:, :3], axis=1).max())
            logger.warning(
                "%s: its NIfTI pixdim spacing disagrees with its sform (corners up to %.2f mm apart); MedGen takes "
                "pixdim's spacing, as ITK and Slicer do, while FSL, nibabel and MONAI's NIfTI reader use the sform. Save "
                "the file with matching pixdim if they should agree.", name, apart)
        return
    qform = nifti.get_qform()
    if np.allclose(sform, qform, atol=1e-2, rtol=1e-4):
        return
    picked = ("the qform" if np.allclose(used, qform, atol=1e-2, rtol=1e-4) else "the sform"
              if np.allclose(used, sform, atol=1e-2, rtol=1e-4) else "neither exactly (ITK's own reading)")
    corner_shift = float(np.linalg.norm(sform[:3, 3] - qform[:3, 3]))
    logger.warning(
        "%s: its NIfTI sform and qform disagree (origins %.2f mm apart); MedGen uses %s, as ITK and Slicer do, while "
        "FSL, nibabel and MONAI's NIfTI reader use the sform. Save the file with one geometry if they should agree.",
        name, corner_shift, picked)


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise BadInputError(f"Folder {folder} holds no DICOM series. Point to a folder of .dcm slices of one series.")
    if len(series_ids) > 1:
        raise BadInputError(
            f"Folder {folder} holds {len(series_ids)} DICOM series ({', '.join(series_ids[:3])}...). "
            "Put each series in its own folder."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    reader.MetaDataDictionaryArrayUpdateOn()  # each slice's tags, for the position check
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise BadInputError(f"Could not read the DICOM series in {folder} ({_first_line(error)}).") from error
    _check_even_slices(reader, image, folder)
    return image


def _check_even_slices(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """:class:`BadInputError` when the slices' positions (Image Position Patient) do not lie on one line along the
    slice normal, evenly spaced. ITK only warns and spreads them evenly, so a missing slice would shift every slice
    after it; and for a gantry-tilted (sheared) series it takes the full distance between slices as the spacing and
    ignores the in-plane shift, so slices far from the first would be misplaced by millimetres."""
    key = "0020|0032"
    count = image.GetDepth()
    if count < 2 or not all(reader.HasMetaDataKey(index, key) for index in range(count)):
        return
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    points = np.asarray([[float(value) for value in reader.GetMetaData(index, key).split("\\")] for index in range(count)])
    offsets = points - points[0]
    positions = offsets @ normal
    sideways = float(np.max(np.linalg.norm(offsets - np.outer(positions, normal), axis=1)))
    if sideways > TILT_TOLERANCE_MM:
        tilt_deg = math.degrees(math.atan2(sideways, abs(float(positions[-1])) or 1e-12))
        raise BadInputError(
            f"The DICOM series in {folder} is sheared (gantry tilt about {tilt_deg:.2g} degrees): its slices shift "
            f"{sideways:.3g} mm sideways across the series, which a volume grid cannot hold. Load it in 3D Slicer "
            "(its DICOM module corrects the tilt) and save the volume as NRRD or NIfTI, or resample it first."
        )
    if count < 3:
        return
    gaps = np.diff(positions)
    typical = float(np.median(gaps))
    if np.max(np.abs(gaps - typical)) > 0.01 * abs(typical) + 1e-3:
        raise BadInputError(
            f"The DICOM series in {folder} has unevenly spaced slices (gaps {float(gaps.min()):.3g} to {float(gaps.max()):.3g} mm, "
            f"typically {typical:.3g} mm): a slice is missing or the series mixes acquisitions, so its geometry would be wrong."
        )


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_orthogonal_axes(direction: np.ndarray, name: str) -> None:
    """Refuse a sheared voxel grid (direction columns not orthonormal): NIfTI cannot store one, so ITK would
    silently turn it into another grid when an output is written, and the result would no longer overlay its source.

    Raises:
        BadInputError: naming the volume and what to do.
    """
    if not np.all(np.isfinite(direction)) or np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise BadInputError(f"{name} {SHEARED_GRID}, which NIfTI outputs cannot keep. {SHEARED_ADVICE}")


def _affine_ras(geometry: sitk.Image | sitk.ImageFileReader) -> np.ndarray:
    """4x4 voxel-index -> RAS mm matrix of a SimpleITK image (or of a file header read by SimpleITK)."""
    direction = np.asarray(geometry.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction @ np.diag(geometry.GetSpacing())
    affine_lps[:3, 3] = geometry.GetOrigin()
    return _LPS_TO_RAS @ affine_lps


def axis_codes(affine: torch.Tensor | np.ndarray) -> str:
    """The axis codes a RAS affine's voxel axes point nearest to, e.g. ``"LPS"`` (nibabel ``aff2axcodes``)."""
    import nibabel as nib

    return "".join(nib.aff2axcodes(np.asarray(affine)))


def oriented(volume: MetaTensor, codes: str) -> MetaTensor:
    """``volume`` ``(C, I, J, K)`` with its voxel axes permuted and flipped to follow ``codes`` (e.g. ``"RAS"``);
    the affine follows, so every voxel keeps its place in space (MONAI ``Orientation`` on a RAS affine)."""
    from monai.transforms import Orientation

    return Orientation(axcodes=codes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(volume)


def load_volume(path: str | os.PathLike, *, label: bool = False, name: str | None = None) -> MetaTensor:
    """Read a 3D volume file or DICOM series folder.

    Args:
        path: ``.nii``, ``.nii.gz``, ``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd`` file or a DICOM series folder.
        label: read as a label map: values must be integers and are returned as ``torch.int64``.
        name: how the volume is called in error messages (default: the file name).

    Returns:
        MetaTensor shaped ``(C, I, J, K)`` (C = pixel components, 1 for scalar images), float32 for
        images, int64 for label maps; ``.affine`` is the 4x4 IJK-to-RAS matrix (float64, mm).

    Raises:
        BadInputError: missing/unreadable/unsupported file, not 3D, NaN/Inf voxels, non-integer labels.
    """
    path = Path(path)
    name = name or path.name
    _check_readable_path(path)
    read = _read_nifti if volume_suffix(path) in (".nii", ".nii.gz") else _read_sitk
    geometry, voxels = read(path, name)
    original_dtype = str(voxels.dtype)
    check_spatial_3d(voxels.shape, name)
    check_orthogonal_axes(np.asarray(geometry.GetDirection(), dtype=np.float64).reshape(3, 3), name)
    if np.issubdtype(voxels.dtype, np.floating) and np.all(np.isfinite(voxels)):
        largest = float(np.abs(voxels).max()) if voxels.size else 0.0
        limit = 2.0**62 if label else float(np.finfo(np.float32).max)
        if largest > limit:
            raise BadInputError(f"{name} holds values up to {largest:.3g}, beyond what MedGen computes with "
                                f"({'int64 labels' if label else 'float32'}): rescale it first.")
    if label:
        data = torch.from_numpy(np.ascontiguousarray(_as_label_array(voxels, name), dtype=np.int64))
    else:
        data = torch.from_numpy(np.ascontiguousarray(voxels, dtype=np.float32))
        check_finite(data, name)
    return MetaTensor(
        data,
        affine=torch.from_numpy(_affine_ras(geometry)),
        meta={"filename_or_obj": str(path), "space": "RAS", "original_dtype": original_dtype},
    )


def _as_label_array(voxels: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(voxels.dtype, np.floating):
        if not np.all(np.isfinite(voxels)) or not np.array_equal(voxels, np.round(voxels)):
            raise BadInputError(
                f"{name} was loaded as a label map but holds non-integer or NaN values. "
                "Pick the segmentation/label file, not an image."
            )
    if voxels.shape[0] != 1:
        raise BadInputError(f"{name} was loaded as a label map but has {voxels.shape[0]} components; a label map has one.")
    return voxels


def _to_sitk(volume: torch.Tensor, affine_ras: np.ndarray, label: bool) -> sitk.Image:
    voxels = volume.detach().cpu()
    if voxels.ndim != 4:
        raise BadInputError(f"Expected a (C, I, J, K) tensor to save but got shape {tuple(voxels.shape)}.")
    if label:
        if not holds_whole_numbers(voxels):
            raise BadInputError("A label map to save holds non-integer values; round or threshold it first.")
        array = voxels.numpy().astype(_label_dtype(voxels))
    else:
        array = voxels.float().numpy()
    array_kji = np.transpose(array, (3, 2, 1, 0))  # (K, J, I, C)
    if array_kji.shape[-1] == 1:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji[..., 0]))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji), isVector=True)
    affine_lps = _LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if not np.all(np.isfinite(affine_lps)) or np.any(spacing <= 0):
        raise BadInputError(f"The volume's affine has a zero-length axis or a non-finite entry (spacing {spacing}); "
                            "cannot save it.")
    check_orthogonal_axes(affine_lps[:3, :3] / spacing, "The volume to save")
    image.SetSpacing(spacing.tolist())
    image.SetDirection((affine_lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(affine_lps[:3, 3].tolist())
    return image


def _label_dtype(voxels: torch.Tensor) -> type:
    low, high = int(voxels.min()), int(voxels.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    return np.int64


def save_volume(
    volume: torch.Tensor,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | torch.Tensor | None = None,
    label: bool = False,
) -> Path:
    """Write a ``(C, I, J, K)`` tensor to a volume file atomically (temp file + rename).

    Args:
        volume: MetaTensor (its ``.affine`` is used) or plain tensor with ``affine`` given.
        path: output file; the format follows the suffix (``.nii.gz``, ``.nrrd``, ``.mha``, ...).
        affine: 4x4 IJK-to-RAS matrix (mm); overrides the MetaTensor's own.
        label: store as the smallest integer type that holds the labels (otherwise float32).

    Returns:
        The written path.
    """
    path = Path(path)
    if not volume_suffix(path) or volume_suffix(path) in DETACHED_SUFFIXES:
        raise BadInputError(f"Cannot save {path.name}: use one of {', '.join(s for s in SUPPORTED_SUFFIXES if s not in DETACHED_SUFFIXES)} "
                            "(a detached header would name the data file by its temporary name).")
    if affine is None:
        if not isinstance(volume, MetaTensor):
            raise BadInputError("save_volume needs an affine: pass a MetaTensor or affine=4x4 IJK-to-RAS matrix.")
        affine = volume.affine
    affine = np.asarray(affine.cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    image = _to_sitk(volume.as_tensor() if isinstance(volume, MetaTensor) else volume, affine, label)
    with atomic_output(path, suffix=volume_suffix(path)) as tmp:  # lower case: ITK picks the format case-sensitively
        sitk.WriteImage(image, str(tmp), useCompression=path.name.lower().endswith(".gz"))
        _check_nifti_complete(tmp, path)
    return path


def _check_nifti_complete(written: Path, path: Path) -> None:
    """Raise ``OSError`` when a NIfTI file came out shorter than its header says. ITK's NIfTI writer reports a
    short write (a full disk) only on stderr; the check reads the header and, for .nii.gz, the gzip trailer
    (uncompressed size modulo 2**32), never the voxels."""
    import nibabel
    from nibabel.filebasedimages import ImageFileError

    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        image = nibabel.load(str(written))  # its proxy's offset: ITK writes vox_offset 0, nibabel resolves it
        needed = int(image.dataobj.offset) + image.header.get_data_dtype().itemsize * int(np.prod(image.header.get_data_shape()))
        if name.endswith(".gz"):
            with open(written, "rb") as stream:
                stream.seek(-4, os.SEEK_END)
                complete = int.from_bytes(stream.read(4), "little") == needed % 2**32
        else:
            complete = written.stat().st_size >= needed
    except (OSError, ValueError, EOFError, ImageFileError):
        complete = False
    if not complete:
        raise OSError(f"Writing {path} was cut short (is the disk full?); the previous file, if any, is kept.")
