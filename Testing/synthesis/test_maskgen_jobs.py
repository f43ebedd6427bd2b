"""The ``maskgen-train`` and ``maskgen`` job kinds through the worker process, with nnU-Net's own dataset check."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import MetaTensor

from medgen.cli import main as cli_main
from medgen.cli.main import build_parser
from medgen.errors import BadInputError
from medgen.io import load_volume, save_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.labels import LabelInfo, save_labels
from medgen.slicer.runner import run_job_blocking, write_job
from medgen.synthesis.maskgen import MaskGenModel
from medgen_testing import verify_nnunet_dataset
from test_maskgen import LUT_A, LUT_B, phantom

FAST = {"vae_steps": 2, "unet_steps": 2, "controlnet_steps": 2, "checker_steps": 2, "checkpoint_every": 1}
ACCEPT_ALL = {"avg_confidence": 0.0, "avg_iou": 0.0, "organ_iou": 0.0, "organ_confidence": 0.0}


def _write_cases(folder, oblique):
    """Source pairs with label values 3 and 7 (remapped to 1, 2 by training), target images, labels.json."""
    affine = torch.from_numpy(oblique)
    sources, labels, targets = [], [], []
    for seed in range(2):
        image, label = phantom(seed, LUT_A, oblique)
        relabelled = torch.where(label.as_tensor() == 1, 3, torch.where(label.as_tensor() == 2, 7, 0))
        sources.append(str(save_volume(image, folder / f"s{seed}_0000.nii.gz")))
        labels.append(str(save_volume(MetaTensor(relabelled, affine=affine), folder / f"s{seed}.nii.gz", label=True)))
        targets.append(str(save_volume(phantom(10 + seed, LUT_B, oblique)[0], folder / f"t{seed}.nii.gz")))
    save_labels([LabelInfo("liver", 3, (1.0, 0.0, 0.0)), LabelInfo("kidney", 7, (0.0, 1.0, 0.0))], folder / "labels.json")
    return sources, labels, targets


def test_maskgen_jobs_end_to_end_with_nnunet_export(tmp_path, oblique, capsys):
    sources, labels, targets = _write_cases(tmp_path, oblique)
    train = run_job_blocking(write_job(
        tmp_path / "jobs", "maskgen-train",
        {"source_images": sources, "source_labels": labels, "target_images": targets, "label_names": str(tmp_path / "labels.json")},
        {"shape": [16, 16, 16], "preset": "tiny", "source_modality": "T1 MRI", "target_modality": "T2 MRI", "region": "abdomen",
         "controlnet_flip_axes": [0, 2], "unet_flip_axes": [0, 2], **FAST},
        device="cpu"), timeout_s=900)
    assert train.returncode == ExitCode.OK, train.error
    assert {"vae", "latents", "unet", "controlnet", "checker"} <= {e["phase"] for e in train.events if e["event"] == "progress"}
    warnings = [e["message"] for e in train.events if e["event"] == "log" and e.get("level") == "warning"]
    assert any("renumbered 1..2 (liver 3 -> 1, kidney 7 -> 2)" in message for message in warnings)
    model = train.result["outputs"]["model"]
    config = MaskGenModel.load(model).config
    assert config.controlnet_flip_axes == (0, 2) and config.unet_flip_axes == (0, 2)

    mask = phantom(5, LUT_A, oblique)[1]
    # dotted names (DICOM UIDs, BIDS entities) are stems up to the volume suffix, not to the first dot
    mask_path = str(save_volume(mask, tmp_path / "1.2.840.5.nii.gz", label=True))
    empty_path = str(save_volume(MetaTensor(torch.zeros_like(mask.as_tensor()), affine=mask.affine), tmp_path / "1.2.840.6.nii.gz", label=True))
    synth = run_job_blocking(write_job(
        tmp_path / "jobs", "maskgen", {"model": model, "masks": [mask_path, empty_path]},
        {"target_modality": "T2 MRI", "candidates": 2, "chunk": 2, "steps": 2, "thresholds": ACCEPT_ALL,
         "nnunet_dataset_id": 77, "nnunet_name": "MaskGen"}, device="cpu", seed=3), timeout_s=900)
    assert synth.returncode == ExitCode.OK, synth.error
    assert synth.result["masks"] == {"1.2.840.5": "accepted", "1.2.840.6": "skipped: empty mask"} and synth.result["accepted"] == 2
    report = json.loads(open(synth.result["outputs"]["report"]).read())
    assert report["seed"] == 3 and [m["status"] for m in report["masks"]] == ["accepted", "skipped: empty mask"]
    image = load_volume(f"{synth.result['outputs']['pairs']}/1.2.840.5_0_image.nii.gz")
    assert torch.allclose(image.affine, mask.affine.to(image.affine.dtype), atol=1e-5)
    dataset = synth.result["outputs"]["nnunet_dataset"]
    document = json.loads(open(f"{dataset}/dataset.json").read())
    assert document["labels"] == {"background": 0, "liver": 1, "kidney": 2} and document["numTraining"] == 2
    verify_nnunet_dataset(dataset)

    # the command line says on stderr what the job did besides its output paths (here: nothing accepted)
    code = cli_main.main(["submit", "maskgen", "--inputs", json.dumps({"model": model, "masks": [empty_path]}),
                          "--params", json.dumps({"target_modality": "T2 MRI"}), "--device", "cpu", "--job-root", str(tmp_path / "cli")])
    said = capsys.readouterr()
    assert code == 0 and '[medgen] masks: {"1.2.840.6": "skipped: empty mask"}' in said.err and "[medgen] accepted: 0" in said.err
    assert set(json.loads(said.out)) == {"pairs", "report"}

    unknown = run_job_blocking(write_job(
        tmp_path / "jobs", "maskgen", {"model": model, "masks": [mask_path]}, {"target_modality": "CT"}, device="cpu"), timeout_s=300)
    assert unknown.returncode == ExitCode.BAD_INPUT
    assert "'CT'" in unknown.error["message"] and "['T1 MRI', 'T2 MRI']" in unknown.error["message"]


def _failed_training(tmp_path, sources, labels, targets):
    """A maskgen-train job on these files that must stop with bad input; returns its result."""
    train = run_job_blocking(write_job(
        tmp_path / "jobs", "maskgen-train", {"source_images": sources, "source_labels": labels, "target_images": targets},
        {"shape": [16, 16, 16], "preset": "tiny", "source_modality": "T1 MRI", "target_modality": "T2 MRI", **FAST}, device="cpu"),
        timeout_s=300)
    assert train.returncode == ExitCode.BAD_INPUT
    return train


def test_maskgen_train_refuses_source_label_maps_without_organs(tmp_path, oblique):
    sources, labels, targets = _write_cases(tmp_path, oblique)
    blank = [str(save_volume(MetaTensor(torch.zeros((1, 16, 16, 16), dtype=torch.int64), affine=torch.from_numpy(oblique)),
                             tmp_path / f"blank{index}.nii.gz", label=True)) for index in range(2)]
    train = _failed_training(tmp_path, sources, blank, targets)
    assert "None of the source label maps ['blank0.nii.gz', 'blank1.nii.gz'] holds an organ" in train.error["message"]


def test_maskgen_train_names_the_files_of_a_pair_whose_geometry_differs(tmp_path, oblique):
    sources, labels, targets = _write_cases(tmp_path, oblique)
    shifted = oblique.copy()
    shifted[:3, 3] += 2.0
    moved = load_volume(labels[1], label=True)
    labels[1] = str(save_volume(MetaTensor(moved.as_tensor(), affine=torch.from_numpy(shifted)), tmp_path / "moved_seg.nii.gz", label=True))
    train = _failed_training(tmp_path, sources, labels, targets)
    assert "s1_0000.nii.gz and moved_seg.nii.gz" in train.error["message"]


def test_maskgen_train_needs_the_modalities(tmp_path, oblique):
    sources, labels, targets = _write_cases(tmp_path, oblique)
    with pytest.raises(BadInputError, match="'target_modality' is a required property"):
        write_job(tmp_path / "jobs", "maskgen-train", {"source_images": sources, "source_labels": labels, "target_images": targets},
                  {"source_modality": "T1 MRI"}, device="cpu")
    with pytest.raises(BadInputError, match="controlnet_flip_axes"):
        write_job(tmp_path / "jobs", "maskgen-train", {"source_images": sources, "source_labels": labels, "target_images": targets},
                  {"source_modality": "T1 MRI", "target_modality": "T2 MRI", "controlnet_flip_axes": [0, 3]}, device="cpu")


def test_cli_commands_map_onto_the_job_kinds(tmp_path, monkeypatch):
    parser = build_parser()
    train = parser.parse_args(["maskgen-train", "--source-images", "a.nii.gz", "--source-labels", "a_seg.nii.gz",
                               "--target-images", "b.nii.gz", "--source-modality", "T1", "--target-modality", "T2", "--flip-axes", "0", "2"])
    synth = parser.parse_args(["maskgen", "model", "m1.nii.gz", "m2.nii.gz", "--target-modality", "T2", "--nnunet-id", "5",
                               "--conditioning-scale", "1.5"])
    assert train.func.__name__ == "cmd_maskgen_train" and train.preset == "tiny" and train.encoding == "one-hot"
    assert train.flip_axes == [0, 2] and parser.parse_args(["maskgen-train", "--source-images", "a", "--source-labels", "b",
                                                            "--target-images", "c", "--source-modality", "T1",
                                                            "--target-modality", "T2"]).flip_axes == []
    submitted = []
    monkeypatch.setattr(cli_main, "_submit", lambda kind, inputs, params, args: submitted.append((kind, params)) or 0)
    assert train.func(train) == 0
    ((kind, params),) = submitted
    assert kind == "maskgen-train" and params["controlnet_flip_axes"] == params["unet_flip_axes"] == [0, 2]
    assert synth.func.__name__ == "cmd_maskgen" and [str(p) for p in synth.masks] == ["m1.nii.gz", "m2.nii.gz"]
    assert synth.candidates == 20 and synth.steps == 50 and synth.guidance_scale == 7.0 and synth.conditioning_scale == 1.5
