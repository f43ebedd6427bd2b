"""nnU-Net v2 export, checked by nnU-Net's own dataset integrity check."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import MetaTensor

from medgen.errors import BadInputError, GeometryMismatchError
from medgen.io import load_volume, save_volume
from medgen.io.folder_lock import LOCK_FILE
from medgen.progress import CallbackReporter
from medgen.synthesis.nnunet_export import export_nnunet
from medgen_testing import verify_nnunet_dataset

LABELS = {"background": 0, "CSF": 1, "grey matter": 2, "white matter": 3}


def _pair(oblique, seed):
    generator = torch.Generator().manual_seed(seed)
    image = MetaTensor(torch.rand((1, 16, 16, 16), generator=generator), affine=torch.from_numpy(oblique))
    label = MetaTensor(torch.randint(0, 4, (1, 16, 16, 16), generator=generator), affine=torch.from_numpy(oblique))
    return image, label


def _verify_with_nnunet(dataset_dir):
    verify_nnunet_dataset(dataset_dir)


def test_synthetic_and_real_cases_pass_nnunet_integrity_check(tmp_path, oblique):
    synthetic = [_pair(oblique, seed) for seed in range(3)]
    dataset = export_nnunet(synthetic, tmp_path, dataset_id=501, name="MedGenTiny", labels=LABELS)
    real_dir = tmp_path / "real"
    real_files = []
    for index, (image, label) in enumerate([_pair(oblique, 10), _pair(oblique, 11)]):
        real_files.append((save_volume(image, real_dir / f"r{index}_0000.nii.gz"), save_volume(label, real_dir / f"r{index}.nii.gz", label=True)))
    assert export_nnunet(real_files, tmp_path, dataset_id=501, name="MedGenTiny", labels=LABELS, case_prefix="real") == dataset
    assert dataset.name == "Dataset501_MedGenTiny"
    document = json.loads((dataset / "dataset.json").read_text())
    assert document["numTraining"] == 5 and document["labels"] == LABELS
    assert document["channel_names"] == {"0": "MRI"} and document["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == [
        "real_0000.nii.gz", "real_0001.nii.gz", "syn_0000.nii.gz", "syn_0001.nii.gz", "syn_0002.nii.gz"]
    _verify_with_nnunet(dataset)
    reread = load_volume(dataset / "labelsTr" / "syn_0001.nii.gz", label=True)
    assert torch.equal(reread.as_tensor(), synthetic[1][1].as_tensor())


def test_label_values_outside_the_dataset_labels_are_refused(tmp_path, oblique):
    image, label = _pair(oblique, 0)
    label[0, 0, 0, 0] = 7
    with pytest.raises(BadInputError, match=r"label values \[7\]"):
        export_nnunet([(image, label)], tmp_path, dataset_id=502, name="Bad", labels=LABELS)


def test_pair_with_different_geometry_is_refused(tmp_path, oblique):
    image, label = _pair(oblique, 0)
    moved = oblique.copy()
    moved[0, 3] += 5.0
    with pytest.raises(GeometryMismatchError, match="case 0 image and case 0 label"):
        export_nnunet([(image, MetaTensor(label.as_tensor(), affine=torch.from_numpy(moved)))], tmp_path, dataset_id=503, name="Geo", labels=LABELS)


@pytest.mark.parametrize("labels", [{"CSF": 1}, {"background": 0, "a": 2}, {"background": 1, "a": 0}])
def test_nnunet_label_rules_are_enforced(tmp_path, oblique, labels):
    with pytest.raises(BadInputError, match="consecutive"):
        export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=504, name="Lab", labels=labels)


def test_adding_cases_with_other_labels_is_refused(tmp_path, oblique):
    export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=505, name="Mix", labels=LABELS)
    with pytest.raises(BadInputError, match="already exists with labels"):
        export_nnunet([_pair(oblique, 1)], tmp_path, dataset_id=505, name="Mix", labels={"background": 0, "x": 1, "y": 2, "z": 3})


def test_adding_cases_with_another_channel_is_refused(tmp_path, oblique):
    """The channel name picks nnU-Net's normalisation (CT: dataset-wide clipping; else per-image z-scoring): CT
    cases added to an MRI dataset would be normalised as MRI, so the export refuses them and writes nothing."""
    dataset = export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=515, name="Chan", labels=LABELS)
    with pytest.raises(BadInputError, match=r"already exists with labels .* and channels \{'0': 'MRI'\}; .*\{'0': 'CT'\}"):
        export_nnunet([_pair(oblique, 1)], tmp_path, dataset_id=515, name="Chan", labels=LABELS, channel_name="CT", case_prefix="ct")
    assert json.loads((dataset / "dataset.json").read_text())["channel_names"] == {"0": "MRI"}
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["syn_0000.nii.gz"]


def test_a_second_export_with_the_same_prefix_numbers_its_cases_after_the_existing_ones(tmp_path, oblique):
    """Exporting more cases under a prefix already in the dataset skips every taken number (syn_0000 and syn_0001
    here), so no earlier case is overwritten and nnU-Net counts all three."""
    first = [_pair(oblique, seed) for seed in range(2)]
    dataset = export_nnunet(first, tmp_path, dataset_id=516, name="Again", labels=LABELS)
    export_nnunet([_pair(oblique, 2)], tmp_path, dataset_id=516, name="Again", labels=LABELS)
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["syn_0000.nii.gz", "syn_0001.nii.gz", "syn_0002.nii.gz"]
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 3
    for index, (_, label) in enumerate([*first, _pair(oblique, 2)]):
        reread = load_volume(dataset / "labelsTr" / f"syn_{index:04d}.nii.gz", label=True)
        assert torch.equal(reread.as_tensor(), label.as_tensor()), index


def test_cancelled_export_leaves_a_consistent_dataset(tmp_path, oblique):
    written = []

    def on_event(event):
        written.append(event["case"])

    reporter = CallbackReporter(on_event, should_stop=lambda: len(written) >= 2)
    from medgen.errors import CancelledError

    pairs = (_pair(oblique, seed) for seed in range(10))  # a generator: streamed, never held in memory
    with pytest.raises(CancelledError):
        export_nnunet(pairs, tmp_path, dataset_id=506, name="Cancel", labels=LABELS, reporter=reporter)
    dataset = tmp_path / "Dataset506_Cancel"
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    assert not [p for p in dataset.rglob("*") if ".part" in p.name]
    _verify_with_nnunet(dataset)


def test_files_that_block_the_export_are_clear_errors(tmp_path, oblique):
    (tmp_path / "a file").write_text("not a folder")
    with pytest.raises(BadInputError, match="a file is a file, but a folder is needed there"):
        export_nnunet([_pair(oblique, 0)], tmp_path / "a file", dataset_id=507, name="Out", labels=LABELS)
    dataset = tmp_path / "Dataset508_Broken"
    dataset.mkdir()
    (dataset / "dataset.json").write_text('{"labels": ')
    with pytest.raises(BadInputError, match="dataset.json exists but cannot be read"):
        export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=508, name="Broken", labels=LABELS)


def test_a_bad_pair_names_its_files_and_the_cases_already_exported(tmp_path, oblique):
    files = []
    for index, (image, label) in enumerate([_pair(oblique, 0), _pair(oblique, 1)]):
        if index == 1:
            label[0, 0, 0, 0] = 9
        files.append((save_volume(image, tmp_path / f"p{index}_0000.nii.gz"), save_volume(label, tmp_path / f"p{index}.nii.gz", label=True)))
    with pytest.raises(BadInputError, match=r"Case 1 \(p1_0000.nii.gz \+ p1.nii.gz\): label values \[9\].*"
                                            r"The 1 case\(s\) exported before it are complete and kept in .*Dataset509_Part"):
        export_nnunet(files, tmp_path / "out", dataset_id=509, name="Part", labels=LABELS)
    verify_nnunet_dataset(tmp_path / "out" / "Dataset509_Part")


def test_a_label_header_within_medgens_tolerance_is_written_on_the_images_grid(tmp_path, oblique):
    """nnU-Net compares spacings with a relative tolerance of 1e-5; a 5e-4 mm header difference passes MedGen's check."""
    image, label = _pair(oblique, 0)
    nudged = oblique.copy()
    nudged[:3, 0] *= 1.0005
    dataset = export_nnunet([(image, MetaTensor(label.as_tensor(), affine=torch.from_numpy(nudged)))], tmp_path,
                            dataset_id=510, name="Header", labels=LABELS)
    _verify_with_nnunet(dataset)


def test_export_refusals_leave_nnunet_usable_datasets(tmp_path, oblique):
    image, label = _pair(oblique, 0)
    fractional = MetaTensor(label.float() + 0.5, affine=label.affine)
    with pytest.raises(BadInputError, match="not whole numbers"):
        export_nnunet([(image, fractional)], tmp_path, dataset_id=511, name="Half", labels=LABELS)
    assert not (tmp_path / "Dataset511_Half").exists()
    with pytest.raises(BadInputError, match="plain tensor"):
        export_nnunet([(image.as_tensor(), label)], tmp_path, dataset_id=511, name="Half", labels=LABELS)
    with pytest.raises(BadInputError, match="No cases to export"):
        export_nnunet([], tmp_path, dataset_id=511, name="Half", labels=LABELS)
    assert [path.name for path in tmp_path.iterdir()] == [LOCK_FILE]  # the raw folder's export lock, no dataset

    export_nnunet([(image, label)], tmp_path, dataset_id=512, name="First", labels=LABELS)
    with pytest.raises(BadInputError, match="id 512 is taken by Dataset512_First"):  # nnU-Net refuses one id twice
        export_nnunet([(image, label)], tmp_path, dataset_id=512, name="Second", labels=LABELS)

    with pytest.raises(BadInputError, match="region-based labels"):
        export_nnunet([(image, label)], tmp_path, dataset_id=513, name="Regions", labels={"background": 0, "whole": [1, 2]})
    with pytest.raises(BadInputError, match="'ignore' label must have the highest value"):
        export_nnunet([(image, label)], tmp_path, dataset_id=513, name="Ignore", labels={"background": 0, "ignore": 1, "a": 2})


def test_adding_cases_keeps_the_datasets_own_settings_and_file_ending(tmp_path, oblique):
    dataset = export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=514, name="Keep", labels=LABELS)
    document = json.loads((dataset / "dataset.json").read_text())
    document["overwrite_image_reader_writer"] = "SimpleITKIO"
    (dataset / "dataset.json").write_text(json.dumps(document))
    export_nnunet([_pair(oblique, 1)], tmp_path, dataset_id=514, name="Keep", labels=LABELS, case_prefix="more")
    document = json.loads((dataset / "dataset.json").read_text())
    assert document["overwrite_image_reader_writer"] == "SimpleITKIO" and document["numTraining"] == 2
    document["file_ending"] = ".mha"
    (dataset / "dataset.json").write_text(json.dumps(document))
    with pytest.raises(BadInputError, match="holds .mha files"):
        export_nnunet([_pair(oblique, 2)], tmp_path, dataset_id=514, name="Keep", labels=LABELS)


def test_a_case_whose_image_cannot_be_written_leaves_no_label_behind(tmp_path, oblique, monkeypatch):
    """nnU-Net counts cases by their files: a label without its image makes the whole dataset unusable."""
    import errno

    from medgen.synthesis import nnunet_export

    dataset = export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=515, name="Full", labels=LABELS)
    real_save = nnunet_export.save_volume

    def disk_full_for_images(volume, path, **kwargs):
        if "imagesTr" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(volume, path, **kwargs)

    monkeypatch.setattr(nnunet_export, "save_volume", disk_full_for_images)
    with pytest.raises(OSError):
        export_nnunet([_pair(oblique, 1)], tmp_path, dataset_id=515, name="Full", labels=LABELS)
    monkeypatch.setattr(nnunet_export, "save_volume", real_save)
    export_nnunet([_pair(oblique, 2)], tmp_path, dataset_id=515, name="Full", labels=LABELS)
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    _verify_with_nnunet(dataset)


def test_a_ctrl_c_right_after_a_case_is_written_still_counts_it(tmp_path, oblique, monkeypatch):
    """Ctrl+C between a case's image and dataset.json left numTraining one short, which nnU-Net's integrity check
    refuses: the interrupt now acts once the case is counted."""
    import os
    import signal

    from medgen.synthesis import nnunet_export

    real_save = nnunet_export.save_volume

    def interrupted_after_the_second_image(volume, path, **kwargs):
        written = real_save(volume, path, **kwargs)
        if path.name == "syn_0001_0000.nii.gz":
            os.kill(os.getpid(), signal.SIGINT)
        return written

    monkeypatch.setattr(nnunet_export, "save_volume", interrupted_after_the_second_image)
    with pytest.raises(KeyboardInterrupt):
        export_nnunet([_pair(oblique, seed) for seed in range(3)], tmp_path, dataset_id=512, name="Stopped", labels=LABELS)
    dataset = tmp_path / "Dataset512_Stopped"
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    assert sorted(path.name for path in (dataset / "imagesTr").iterdir()) == ["syn_0000_0000.nii.gz", "syn_0001_0000.nii.gz"]
    verify_nnunet_dataset(dataset)


def test_a_label_left_without_its_image_is_not_counted_and_its_id_is_reused(tmp_path, oblique):
    """A writer killed between a case's label and its image leaves the label alone: nnU-Net counts cases by
    image, so the next export must not count it (numTraining would disagree) and writes that case whole."""
    dataset = export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=511, name="Orphan", labels=LABELS)
    orphan = dataset / "labelsTr" / "syn_0001.nii.gz"
    orphan.write_bytes((dataset / "labelsTr" / "syn_0000.nii.gz").read_bytes())
    export_nnunet([_pair(oblique, 1)], tmp_path, dataset_id=511, name="Orphan", labels=LABELS)
    assert (dataset / "imagesTr" / "syn_0001_0000.nii.gz").is_file()
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    verify_nnunet_dataset(dataset)


def test_a_dataset_that_lists_its_cases_in_dataset_json_is_not_extended(tmp_path, oblique):
    dataset = export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=512, name="Listed", labels=LABELS)
    document = json.loads((dataset / "dataset.json").read_text())
    document["dataset"] = {"syn_0000": {"images": ["imagesTr/syn_0000_0000.nii.gz"], "label": "labelsTr/syn_0000.nii.gz"}}
    (dataset / "dataset.json").write_text(json.dumps(document))
    with pytest.raises(BadInputError, match="lists its cases in dataset.json"):
        export_nnunet([_pair(oblique, 1)], tmp_path, dataset_id=512, name="Listed", labels=LABELS, case_prefix="real")
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["syn_0000.nii.gz"]


def test_ct_cases_must_be_in_hounsfield_units(tmp_path, oblique):
    """nnU-Net's CT normalisation pools intensities over all cases: generated images in [0, 1] next to real HU
    would end up nearly constant, so a 'CT' export refuses them and says which channel name to use."""
    with pytest.raises(BadInputError, match=r"Case 0: its intensities span .*\.\.1, not Hounsfield units, but the channel .CT. has nnU-Net.*channel name"):
        export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=513, name="Ct", labels=LABELS, channel_name="CT")
    image, label = _pair(oblique, 1)
    hounsfield = MetaTensor(image.as_tensor() * 2000 - 1000, affine=image.affine)
    verify_nnunet_dataset(export_nnunet([(hounsfield, label)], tmp_path, dataset_id=513, name="Ct", labels=LABELS,
                                        channel_name="CT"))
    from medgen.synthesis.nnunet_export import check_channel_of_generated

    check_channel_of_generated("MRI")
    for spelling in ("CT", "ct", "Ct"):  # nnU-Net compares the channel name ignoring case
        with pytest.raises(BadInputError, match="Generated pairs cannot be exported as CT"):  # said before generating
            check_channel_of_generated(spelling)
    (tmp_path / "Dataset514_notes.txt").write_text("a file, not a dataset")  # nnU-Net lists folders only
    export_nnunet([(hounsfield, label)], tmp_path, dataset_id=514, name="Free", labels=LABELS, channel_name="ct")


def test_exporting_the_same_files_again_adds_no_copies(tmp_path, oblique):
    """Copies of a case could land in both training and validation folds and inflate nnU-Net's scores."""
    files = []
    for index, (image, label) in enumerate([_pair(oblique, 0), _pair(oblique, 1)]):
        files.append((save_volume(image, tmp_path / f"r{index}_0000.nii.gz"), save_volume(label, tmp_path / f"r{index}.nii.gz", label=True)))
    dataset = export_nnunet(files, tmp_path / "raw", dataset_id=516, name="Again", labels=LABELS, case_prefix="real")
    logs = []
    export_nnunet(files + [_pair(oblique, 2)], tmp_path / "raw", dataset_id=516, name="Again", labels=LABELS,
                  case_prefix="real", reporter=CallbackReporter(lambda event: logs.append(event.get("message", ""))))
    assert sorted(p.name for p in (dataset / "labelsTr").iterdir()) == ["real_0000.nii.gz", "real_0001.nii.gz", "real_0002.nii.gz"]
    assert any("Case 0 (r0_0000.nii.gz + r0.nii.gz) is already in Dataset516_Again as real_0000: not added again" in m
               for m in logs)
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 3
    verify_nnunet_dataset(dataset)


def test_an_export_waits_for_another_one_into_the_same_raw_folder(tmp_path, oblique, monkeypatch):
    """Two exports at once numbered their cases from the same view of the dataset and overwrote each other's files,
    and nnU-Net's checker could not tell: the second now waits for the first, or gives up with a clear error."""
    import subprocess
    import sys
    import time

    from medgen.synthesis import nnunet_export

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from medgen.io.folder_lock import exclusive_folder\n"
        f"with exclusive_folder({str(tmp_path)!r}, 'raw'):\n    print('held', flush=True); time.sleep(3)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(nnunet_export, "EXPORT_WAIT_S", 0.0)
        with pytest.raises(BadInputError, match="nnU-Net raw folder .* is in use by another run"):
            export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=513, name="Waited", labels=LABELS)
        monkeypatch.setattr(nnunet_export, "EXPORT_WAIT_S", 60.0)
        logs, started = [], time.monotonic()
        dataset = export_nnunet([_pair(oblique, 0)], tmp_path, dataset_id=513, name="Waited", labels=LABELS,
                                reporter=CallbackReporter(lambda event: logs.append(event.get("message"))))
        assert time.monotonic() - started > 1.0  # it ran once the other let go of the folder
        assert logs[0] == f"Waiting for another export into {tmp_path} to finish."
        assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 1
    finally:
        holder.kill()
        holder.wait()
