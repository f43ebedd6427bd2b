"""Export image/label pairs as an nnU-Net v2 raw dataset.

Layout (nnU-Net v2): ``Dataset{ID:03d}_{name}/imagesTr/{case}_0000.nii.gz``,
``labelsTr/{case}.nii.gz`` and ``dataset.json`` (channel_names, labels, numTraining, file_ending).
Cases are written one at a time (memory stays bounded for any N), each file atomically; dataset.json
is rewritten atomically after every case, with Ctrl+C and SIGTERM held back until it is, so a cancelled or
interrupted export is still a consistent dataset. A process killed outright (SIGKILL, out of memory) may leave
numTraining one short; exporting to the dataset again (even zero cases) recounts it.
Correctness is checked in the tests with nnU-Net's own ``verify_dataset_integrity``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Union

import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError
from medgen.io import check_finite, check_same_geometry, holds_whole_numbers, load_volume, save_volume
from medgen.io.atomic import ensure_folder, interrupts_deferred, write_text_atomic
from medgen.io.folder_lock import exclusive_folder
from medgen.progress import Reporter, as_reporter

FILE_ENDING = ".nii.gz"
#: how long an export waits for another one into the same raw folder before it gives up (seconds)
EXPORT_WAIT_S = 600.0
#: in the dataset folder: digest of each exported case's voxels and grid -> its case id, so that exporting the same
#: files again adds no copies (identical cases in training and validation folds would inflate the scores)
SOURCES_FILE = "medgen_exported_cases.json"
VolumeLike = Union[str, os.PathLike, torch.Tensor]
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+$")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``Dataset{ID:03d}_{name}`` as nnU-Net expects (ID 1..999, name of letters/digits/_/-)."""
    if not 1 <= int(dataset_id) <= 999:
        raise BadInputError(f"nnU-Net dataset ids run from 1 to 999; got {dataset_id}.")
    if not _NAME_PATTERN.fullmatch(name):
        raise BadInputError(f"Dataset name {name!r} may only hold letters, digits, '_' and '-'.")
    return f"Dataset{int(dataset_id):03d}_{name}"


def check_nnunet_labels(labels: dict[str, int]) -> dict[str, int]:
    """nnU-Net's label rules: ``background`` is 0, the values are the consecutive integers 0..K-1, and an
    ``ignore`` label has the highest value. Region-based labels (lists of values) are not written by MedGen."""
    odd = {name: value for name, value in labels.items() if not isinstance(value, int) or isinstance(value, bool)}
    if odd:
        raise BadInputError(f"nnU-Net labels must be single integer values; got {odd} (region-based labels, lists of "
                            "values, are not supported by this export).")
    values = sorted(labels.values())
    if "ignore" in labels and labels["ignore"] != values[-1]:
        raise BadInputError(f"nnU-Net's 'ignore' label must have the highest value ({values[-1]}); got {labels['ignore']}.")
    if labels.get("background") != 0 or values != list(range(len(values))):
        raise BadInputError(
            f"nnU-Net labels must map 'background' to 0 and use consecutive integers 0..K-1; got {labels}. "
            "Remap the label values first (medgen.synthesis.prepare does this)."
        )
    return {name: int(value) for name, value in sorted(labels.items(), key=lambda item: item[1])}


def _as_volume(volume: VolumeLike, label: bool, what: str):
    if isinstance(volume, MetaTensor):
        return volume
    if isinstance(volume, torch.Tensor):
        raise BadInputError(f"The {what} is a plain tensor: give a MetaTensor (from medgen.io) or a file, so that its "
                            "voxel grid is known.")
    return load_volume(volume, label=label, name=f"{what} {Path(volume).name}")


def _dataset_json(labels: dict[str, int], channel_name: str, num_training: int, existing: dict | None) -> str:
    """dataset.json; an existing one keeps every other key (reader/writer override, name, reference, ...)."""
    document = dict(existing) if existing else {
        "channel_names": {"0": channel_name},
        "labels": labels,
        "file_ending": FILE_ENDING,
        "licence": "see the source data",
        "description": "written by MedGen (medgen.synthesis.export_nnunet)",
    }
    document["numTraining"] = num_training
    return json.dumps(document, indent=2) + "\n"


def _existing_cases(labels_dir: Path) -> set[str]:
    """Case ids with a label map and its image (what nnU-Net counts); a label whose image is missing (a writer
    killed between the two) is reused by the next case written under its id."""
    images_dir = labels_dir.parent / "imagesTr"
    return {case for path in labels_dir.glob(f"*{FILE_ENDING}")
            if (images_dir / f"{(case := path.name[: -len(FILE_ENDING)])}_0000{FILE_ENDING}").is_file()}


def export_nnunet(
    cases: Iterable[tuple[VolumeLike, VolumeLike]],
    out_root: str | os.PathLike,
    *,
    dataset_id: int,
    name: str,
    labels: dict[str, int],
    channel_name: str = "MRI",
    case_prefix: str = "syn",
    reporter: Reporter | None = None,
) -> Path:
    """Write (image, label) pairs into an nnU-Net v2 raw dataset folder (created or extended).

    Calling it again on the same dataset with another ``case_prefix`` adds cases, which is how
    synthetic and real cases are mixed (e.g. ``syn_0000`` ... and ``real_0000`` ...).

    Args:
        cases: pairs of image and label map, each a file path or a ``(1, I, J, K)`` MetaTensor from
            :mod:`medgen.io`; image and label must share one voxel grid.
        out_root: folder that holds nnU-Net datasets (``nnUNet_raw``).
        dataset_id, name: give the folder ``Dataset{ID:03d}_{name}``.
        labels: structure name -> label value, with ``background`` 0 and consecutive values.
        channel_name: nnU-Net channel name (``CT`` selects CT normalisation, anything else z-scoring).
        case_prefix: prefix of the case identifiers written by this call.
        reporter: progress per written case; cancellation between cases.

    Returns:
        The dataset folder.
    """
    labels = check_nnunet_labels(labels)
    if not _NAME_PATTERN.fullmatch(case_prefix):
        raise BadInputError(f"Case prefix {case_prefix!r} may only hold letters, digits, '_' and '-'.")
    reporter = as_reporter(reporter)
    dataset_dir = Path(out_root) / dataset_folder_name(dataset_id, name)
    # one export at a time into a raw folder: two would number their cases from the same view and overwrite each
    # other's files (and both pass nnU-Net's checker), or take one dataset id under two names
    with exclusive_folder(out_root, "nnU-Net raw folder", wait_s=EXPORT_WAIT_S,
                          on_wait=lambda: reporter.log(f"Waiting for another export into {out_root} to finish.", "warning")):
        check_free_dataset_id(out_root, int(dataset_id), dataset_dir.name)
        existing_json = _check_compatible(dataset_dir, labels, channel_name)
        images_dir, labels_dir = ensure_folder(dataset_dir / "imagesTr"), ensure_folder(dataset_dir / "labelsTr")
        existing = _existing_cases(labels_dir)
        exported = _exported_digests(dataset_dir, existing)
        allowed_values = set(labels.values())
        cases = list(cases) if not hasattr(cases, "__next__") else cases
        total = len(cases) if hasattr(cases, "__len__") else 0
        index = 0
        written = 0
        for number, (image_like, label_like) in enumerate(cases):
            reporter.check_cancelled()
            case_name = _case_name(image_like, label_like, number)
            try:
                image, label_map = _as_volume(image_like, False, "image"), _as_volume(label_like, True, "label")
                _check_pair(image, label_map, allowed_values, case_name)
                if is_ct_channel(channel_name):
                    _check_hounsfield(image, case_name)
            except BadInputError as error:
                if not written:
                    _remove_if_empty(images_dir, labels_dir, dataset_dir)
                    raise
                raise BadInputError(f"{error} The {written} case(s) exported before it are complete and kept in {dataset_dir}.") from None
            digest = _case_digest(image, label_map)
            if digest in exported:
                reporter.log(f"{case_name[:1].upper()}{case_name[1:]} is already in {dataset_dir.name} as {exported[digest]}: not added "
                             "again.", "warning")
                continue
            while f"{case_prefix}_{index:04d}" in existing:
                index += 1
            case = f"{case_prefix}_{index:04d}"
            # the label first (a case is counted by its label), on the image's exact header: nnU-Net compares spacing
            # with a relative tolerance of 1e-5, tighter than the geometry check above
            # a Ctrl+C or cancel between the image and dataset.json would leave numTraining one short, which nnU-Net's
            # integrity check refuses; a SIGKILL there still can, and the next export to the dataset recounts it
            with interrupts_deferred():
                label_path = save_volume(MetaTensor(label_map.as_tensor(), affine=image.affine), labels_dir / f"{case}{FILE_ENDING}",
                                         label=True)
                try:
                    save_volume(image.float(), images_dir / f"{case}_0000{FILE_ENDING}")
                except BaseException:
                    label_path.unlink(missing_ok=True)  # a label without its image would break nnU-Net's case count
                    raise
                existing.add(case)
                exported[digest] = case
                write_text_atomic(dataset_dir / SOURCES_FILE, json.dumps(exported, indent=1) + "\n")
                written += 1
                write_text_atomic(dataset_dir / "dataset.json", _dataset_json(labels, channel_name, len(existing), existing_json))
            reporter.progress("export", number + 1, max(total, number + 1), case=case)
        if not existing:
            _remove_if_empty(images_dir, labels_dir, dataset_dir)
            raise BadInputError("No cases to export: nothing was written. Give at least one image/label pair.")
        write_text_atomic(dataset_dir / "dataset.json",
                          _dataset_json(labels, channel_name, len(_existing_cases(labels_dir)), existing_json))
        return dataset_dir


def _case_digest(image: MetaTensor, label: MetaTensor) -> str:
    """SHA-256 of a case's image and label voxels and its grid: the same case, whatever file it came from."""
    digest = hashlib.sha256()
    for tensor in (image.as_tensor().float(), label.as_tensor().long(), torch.as_tensor(image.affine, dtype=torch.float64)):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _exported_digests(dataset_dir: Path, existing: set[str]) -> dict[str, str]:
    """The digests of :data:`SOURCES_FILE` whose cases are still in the dataset (an unreadable record counts as
    empty: it only prevents copies)."""
    try:
        recorded = json.loads((dataset_dir / SOURCES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {digest: case for digest, case in recorded.items() if case in existing} if isinstance(recorded, dict) else {}


def _remove_if_empty(*folders: Path) -> None:
    """Remove the export's folders while they hold nothing: nnU-Net cannot use a dataset without cases (its checker
    fails on one), and a folder left behind would take the dataset id."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_free_dataset_id(out_root: str | os.PathLike, dataset_id: int, folder_name: str = "") -> None:
    """:class:`BadInputError` when another dataset folder than ``folder_name`` in ``out_root`` holds
    ``dataset_id``: nnU-Net refuses an id held by two ("More than one dataset name found")."""
    out_root = Path(out_root)
    if not out_root.is_dir():
        return
    others = sorted(path.name for path in out_root.glob(f"Dataset{dataset_id:03d}_*")
                    if path.is_dir() and path.name != folder_name)
    if others:
        raise BadInputError(f"nnU-Net dataset id {dataset_id} is taken by {others[0]} in {out_root}; use another id "
                            "(medgen export-nnunet can also add cases to that dataset under its own name).")


def _check_compatible(dataset_dir: Path, labels: dict[str, int], channel_name: str) -> dict | None:
    """The existing dataset.json, when new cases fit it (same labels, channel and file ending); None for a new dataset."""
    json_path = dataset_dir / "dataset.json"
    if not json_path.exists():
        return None
    try:
        existing = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise BadInputError(
            f"{json_path} exists but cannot be read ({error}). Fix or remove it, or export to another dataset id."
        ) from None
    if not isinstance(existing, dict):
        raise BadInputError(f"{json_path} exists but is not an nnU-Net dataset.json. Fix or remove it, or use another dataset id.")
    if "dataset" in existing:
        raise BadInputError(f"{dataset_dir.name} lists its cases in dataset.json ('dataset' key), and cases added to the "
                            "folders would be missing from that list; export to another dataset id.")
    if existing.get("labels") != labels or existing.get("channel_names") != {"0": channel_name}:
        raise BadInputError(
            f"{dataset_dir.name} already exists with labels {existing.get('labels')} and channels "
            f"{existing.get('channel_names')}; new cases have {labels} and {{'0': {channel_name!r}}}. "
            "Use another dataset id or the same labels/channel."
        )
    if existing.get("file_ending") != FILE_ENDING:
        raise BadInputError(f"{dataset_dir.name} holds {existing.get('file_ending')} files; this export writes {FILE_ENDING}, "
                            "and nnU-Net would see only the cases of one ending. Export to another dataset id.")
    return existing


#: why generated images (in [0, 1]) and a "CT" channel do not go together
_POOLED_CT = ("the channel 'CT' has nnU-Net normalise with intensity percentiles pooled over all cases, so images in "
              "[0, 1] (what MedGen's generators write) next to real Hounsfield units would end up nearly constant. Export "
              "with another channel name (e.g. 'MRI': each case z-scored on its own), for the real cases too.")


def is_ct_channel(channel_name: str) -> bool:
    """Whether nnU-Net normalises this channel as CT (it compares the name ignoring case)."""
    return channel_name.casefold() == "ct"


def check_channel_of_generated(channel_name: str) -> None:
    """:class:`BadInputError` for a "CT" export of generated pairs, before any is generated (see :func:`_check_hounsfield`)."""
    if is_ct_channel(channel_name):
        raise BadInputError(f"Generated pairs cannot be exported as CT: {_POOLED_CT}")


def _check_hounsfield(image: MetaTensor, name: str) -> None:
    """:class:`BadInputError` for a "CT" case whose intensities span at most 2, so not Hounsfield units."""
    low, high = float(image.min()), float(image.max())
    if high - low <= 2.0:
        raise BadInputError(f"{name[:1].upper()}{name[1:]}: its intensities span {low:.3g}..{high:.3g}, not Hounsfield "
                            f"units, but {_POOLED_CT}")


def _case_name(image_like: VolumeLike, label_like: VolumeLike, number: int) -> str:
    """How a case is called in error messages: its files when it came as paths, its position otherwise."""
    if isinstance(image_like, torch.Tensor) or isinstance(label_like, torch.Tensor):
        return f"case {number}"
    return f"case {number} ({Path(image_like).name} + {Path(label_like).name})"


def _check_pair(image, label_map, allowed_values: set[int], case: str) -> None:
    sentence_start = case[:1].upper() + case[1:]
    if image.shape[0] != 1 or label_map.shape[0] != 1:
        raise BadInputError(f"{sentence_start}: expected single-channel image and label, got {tuple(image.shape)} and {tuple(label_map.shape)}.")
    check_finite(image, f"{case} image")
    check_same_geometry(image, label_map, f"{case} image", f"{case} label")
    values = torch.unique(torch.as_tensor(label_map))
    if not holds_whole_numbers(values):
        raise BadInputError(f"{sentence_start}: the label map holds values that are not whole numbers.")
    found = {int(v) for v in values.tolist()}
    unexpected = sorted(found - allowed_values)
    if unexpected:
        raise BadInputError(
            f"{sentence_start}: label values {unexpected} are not among the dataset's labels {sorted(allowed_values)}."
        )
