"""Few-shot segmentation fine-tuning end to end on a tiny MONAI UNet model folder."""

from __future__ import annotations

import json

import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet

from medgen_testing import TINY_UNET_KWARGS, blob_case, pretrained_blob_model, tiny_unet_spec
from medgen.adapt.finetune import FinetuneConfig, finetune_segmentation, sample_patch
from medgen.errors import BadInputError, CancelledError
from medgen.io import load_volume, save_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.models import Preprocessing, save_model
from medgen.models.segmentation import load_segmentation_model, segment
from medgen.peft import inject
from medgen.progress import CallbackReporter
from medgen.slicer.runner import run_job_blocking, write_job


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """A tiny UNet pretrained (full fine-tuning) on *bright* blobs: the 'pretrained model' to adapt."""
    return pretrained_blob_model(tmp_path_factory.mktemp("scratch"), tmp_path_factory.mktemp("unet"))


def test_foreground_patches_hit_the_label():
    image, label = torch.rand(1, 24, 24, 24), torch.zeros(1, 24, 24, 24, dtype=torch.int64)
    label[0, 20:22, 1:3, 5:7] = 1
    hits = sum(int(sample_patch(image, label, (8, 8, 8), 1.0)[1].sum() > 0) for _ in range(20))
    assert hits == 20
    # with a ratio of 0 every centre is drawn from the whole volume: an 8³ patch of 24³ rarely holds the 2³ label
    hits = sum(int(sample_patch(image, label, (8, 8, 8), 0.0)[1].sum() > 0) for _ in range(20))
    assert hits <= 5
    with pytest.raises(BadInputError, match="larger than the volume"):
        sample_patch(image, label, (32, 8, 8), 0.5)


def test_tenvoo_adapts_a_pretrained_model_to_a_new_contrast(model_folder, oblique, tmp_path):
    model = load_segmentation_model(str(model_folder))
    model.network.softmax = False
    inject(model.network, "tenvoo-l", rank=2, exclude_first_last_conv=False)
    training = [blob_case(seed, oblique) for seed in range(3)]
    held_out = blob_case(10, oblique)
    from medgen.metrics import dice_per_class

    before = dice_per_class(segment(model, held_out[0])[0], held_out[1][0], 2)[1]
    result = finetune_segmentation(model, training, FinetuneConfig(steps=20, val_every=10, lr=1e-2, amp=False),
                                   checkpoint_dir=tmp_path / "ckpt", validation=held_out)
    prediction = segment(model, held_out[0])
    after = dice_per_class(prediction[0], held_out[1][0], 2)[1]
    assert before < 0.2 and after > 0.7, (before, after, result.history)
    assert torch.allclose(prediction.affine, held_out[0].affine)
    assert result.best_val_dice == pytest.approx(max(entry["val_dice"] for entry in result.history))


def test_cancel_keeps_the_last_checkpoint_and_a_rerun_resumes(model_folder, oblique, tmp_path):
    model = load_segmentation_model(str(model_folder))
    inject(model.network, "bitfit")
    steps_seen, totals = [], set()
    reporter = CallbackReporter(lambda e: (steps_seen.append(e["step"]), totals.add(e["total"])) if e["event"] == "progress" else None,
                                should_stop=lambda: len(steps_seen) >= 7)
    with pytest.raises(CancelledError):
        finetune_segmentation(model, [blob_case(0, oblique)], FinetuneConfig(steps=20, val_every=5, amp=False),
                              checkpoint_dir=tmp_path / "ckpt", reporter=reporter)
    assert (tmp_path / "ckpt" / "latest.json").exists()
    assert totals == {20}  # one bar for the whole run, though it trains in segments up to each validation
    resumed = []
    result = finetune_segmentation(model, [blob_case(0, oblique)], FinetuneConfig(steps=20, val_every=5, amp=False),
                                   checkpoint_dir=tmp_path / "ckpt",
                                   reporter=CallbackReporter(lambda e: resumed.append(e["step"]) if e["event"] == "progress" else None))
    assert result.steps == 20 and min(resumed) > 1  # continued after the checkpoint, not from step 1


@pytest.mark.parametrize("method", ["bitfit", "full"])
def test_a_run_continues_only_with_its_settings_data_and_base_model(model_folder, oblique, tmp_path, method):
    """A resume restores the optimiser (its learning rate) and the whole network from the checkpoint: other settings,
    data or another base model would silently be the old run, so they are refused; the patience may change. Full
    fine-tuning freezes nothing, so its base model is told apart by all the weights it starts from."""

    def base_model(shift: float = 0.0):  # each run starts from the model folder, as a job does
        model = load_segmentation_model(str(model_folder))
        with torch.no_grad():
            next(model.network.parameters()).add_(shift)
        inject(model.network, method)
        return model

    config = FinetuneConfig(steps=4, val_every=2, amp=False)
    finetune_segmentation(base_model(), [blob_case(0, oblique)], config, checkpoint_dir=tmp_path)
    with pytest.raises(BadInputError, match=r"lr 0.001 -> 0.5"):
        finetune_segmentation(base_model(), [blob_case(0, oblique)], FinetuneConfig(steps=4, val_every=2, amp=False, lr=0.5),
                              checkpoint_dir=tmp_path)
    with pytest.raises(BadInputError, match=r"steps 4 -> 6"):  # the cosine schedule spans the steps
        finetune_segmentation(base_model(), [blob_case(0, oblique)], FinetuneConfig(steps=6, val_every=2, amp=False),
                              checkpoint_dir=tmp_path)
    with pytest.raises(BadInputError, match="other training data"):
        finetune_segmentation(base_model(), [blob_case(1, oblique)], config, checkpoint_dir=tmp_path)
    with pytest.raises(BadInputError, match="frozen_weights"):
        finetune_segmentation(base_model(shift=0.1), [blob_case(0, oblique)], config, checkpoint_dir=tmp_path)
    result = finetune_segmentation(base_model(), [blob_case(0, oblique)], FinetuneConfig(steps=4, val_every=2, amp=False, patience=9),
                                   checkpoint_dir=tmp_path)
    assert result.steps == 4


def test_a_volume_thinner_than_the_patch_is_padded_as_inference_pads_it(model_folder, oblique, tmp_path):
    """A thick-slice scan with fewer slices than the patch trains (zero-padded, with a warning) like it infers."""
    model = load_segmentation_model(str(model_folder))
    inject(model.network, "bitfit")
    image, label = blob_case(0, oblique)
    thin = (MetaTensor(image.as_tensor()[..., 8:18], affine=image.affine), MetaTensor(label.as_tensor()[..., 8:18], affine=label.affine))
    assert thin[0].shape[-1] < model.patch_size[-1]
    logs = []
    result = finetune_segmentation(model, [thin], FinetuneConfig(steps=2, val_every=2, amp=False), checkpoint_dir=tmp_path,
                                   reporter=CallbackReporter(lambda event: logs.append(event.get("message", ""))))
    assert result.steps == 2
    assert any("smaller than the training patch" in message and "zero-padded" in message for message in logs)


def test_bad_training_data_is_refused_before_training(model_folder, oblique, tmp_path):
    model = load_segmentation_model(str(model_folder))
    inject(model.network, "bitfit")
    image, label = blob_case(0, oblique)
    with pytest.raises(BadInputError, match="Training segmentation 0 has no labelled voxel"):
        finetune_segmentation(model, [(image, label * 0)], FinetuneConfig(steps=2), checkpoint_dir=tmp_path)
    with pytest.raises(BadInputError, match=r"label values \[0, 3\].*classes 0..1"):
        finetune_segmentation(model, [(image, label * 3)], FinetuneConfig(steps=2), checkpoint_dir=tmp_path)
    # a fractional value is no class: read as 1 by the check, it would train as 2 after prepare_volume's rounding
    with pytest.raises(BadInputError, match="Training segmentation 0 holds values that are not whole numbers"):
        finetune_segmentation(model, [(image, label.float() * 1.5)], FinetuneConfig(steps=2), checkpoint_dir=tmp_path)
    # a file's name is used when the map came from one; the validation map is checked before any training step
    named = load_volume(save_volume(label * 3, tmp_path / "held_seg.nii.gz", label=True), label=True)
    with pytest.raises(BadInputError, match=r"held_seg.nii.gz has label values \[0, 3\]"):
        finetune_segmentation(model, [(image, label)], FinetuneConfig(steps=2), checkpoint_dir=tmp_path / "v", validation=(image, named))
    with pytest.raises(BadInputError, match="The validation segmentation has no labelled voxel"):
        finetune_segmentation(model, [(image, label)], FinetuneConfig(steps=2), checkpoint_dir=tmp_path / "v", validation=(image, label * 0))
    assert not (tmp_path / "v").exists()
    with pytest.raises(BadInputError, match=r"The image is constant \(every voxel 2\): it has no contrast to segment"):
        segment(model, image * 0 + 2, "cpu")
    for parameter in model.network.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(BadInputError, match="no trainable parameters"):
        finetune_segmentation(model, [(image, label)], FinetuneConfig(steps=2), checkpoint_dir=tmp_path)


def test_finetune_infer_evaluate_jobs(model_folder, oblique, tmp_path):
    files = []
    for seed in range(3):
        image, label = blob_case(seed, oblique)
        files.append((str(save_volume(image, tmp_path / f"i{seed}.nii.gz")), str(save_volume(label, tmp_path / f"l{seed}.nii.gz", label=True))))
    held_image, held_label = blob_case(10, oblique)
    held = (str(save_volume(held_image, tmp_path / "held.nii.gz")), str(save_volume(held_label, tmp_path / "held_l.nii.gz", label=True)))
    finetune = run_job_blocking(write_job(tmp_path / "jobs", "finetune", {
        "images": [f[0] for f in files], "labels": [f[1] for f in files], "model_folder": str(model_folder),
        "val_image": held[0], "val_label": held[1]},
        {"method": "tenvoo-l", "method_options": {"rank": 2, "exclude_first_last_conv": False}, "steps": 20, "lr": 1e-2, "val_every": 10},
        device="cpu"), timeout_s=600)
    assert finetune.returncode == ExitCode.OK, finetune.error
    report = json.loads(open(finetune.result["outputs"]["report"]).read())
    assert report["trainable_parameters"] > 0 and report["steps"] == 20
    adapter = finetune.result["outputs"]["adapter"]
    infer = run_job_blocking(write_job(tmp_path / "jobs", "infer", {"image": held[0], "adapter": adapter, "model_folder": str(model_folder)}), timeout_s=300)
    assert infer.returncode == ExitCode.OK, infer.error
    segmentation = load_volume(infer.result["outputs"]["segmentation"], label=True)
    assert torch.allclose(segmentation.affine, held_image.affine, atol=1e-5) and segmentation.shape == held_label.shape
    evaluate = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"image": held[0], "reference": held[1], "adapter": adapter, "model_folder": str(model_folder)}), timeout_s=300)
    assert evaluate.returncode == ExitCode.OK, evaluate.error
    assert evaluate.result["adapted_dice"][0] > evaluate.result["base_dice"][0]
    three = str(save_volume(held_label * 3, tmp_path / "held_3.nii.gz", label=True))
    refused = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {"image": held[0], "reference": three, "model_folder": str(model_folder)}),
                               timeout_s=300)
    assert refused.returncode == ExitCode.BAD_INPUT and "The reference held_3.nii.gz has label values [0, 3]" in refused.error["message"]


def test_adapter_of_another_base_is_refused(model_folder, oblique, tmp_path):
    model = load_segmentation_model(str(model_folder))
    inject(model.network, "bitfit")
    from medgen.peft import save_adapter

    save_adapter(model.network, tmp_path / "adapter")
    other = tmp_path / "other"
    torch.manual_seed(5)
    save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(preprocessing=Preprocessing(patch_size=[16, 16, 16]), name=""), other)
    image, _ = blob_case(0, oblique)
    job = run_job_blocking(write_job(tmp_path / "jobs", "infer", {"image": str(save_volume(image, tmp_path / "x.nii.gz")),
                                                                   "adapter": str(tmp_path / "adapter"), "model_folder": str(other)}), timeout_s=300)
    assert job.returncode == ExitCode.BAD_INPUT and "base" in job.error["message"]


def _job_context(job_dir):
    """The context the worker gives a handler, for running it in this process."""
    from medgen.jobs.context import JobContext
    from medgen.jobs.spec import load_job

    return JobContext(job_dir=job_dir, spec=load_job(job_dir), device=torch.device("cpu"), reporter=CallbackReporter())


def test_the_finetune_job_passes_every_training_setting(oblique, tmp_path, monkeypatch):
    """Each training setting of a finetune job (foreground_ratio included) and the job's seed reach the fine-tuning,
    none left at its default."""
    import medgen.adapt.jobs as jobs

    torch.manual_seed(0)
    save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(), tmp_path / "model")
    image, label = blob_case(0, oblique)
    inputs = {"model_folder": str(tmp_path / "model"), "images": [str(save_volume(image, tmp_path / "i.nii.gz"))],
              "labels": [str(save_volume(label, tmp_path / "l.nii.gz", label=True))]}
    settings = {"steps": 7, "lr": 0.02, "batch_size": 2, "val_every": 3, "patience": 4, "foreground_ratio": 0.9}
    job_dir = write_job(tmp_path / "jobs", "finetune", inputs, {"method": "bitfit", **settings}, device="cpu", seed=11)
    configs = []

    class Stop(Exception):
        pass

    def capture(model, training, config, **kwargs):
        configs.append(config)
        raise Stop

    monkeypatch.setattr(jobs, "finetune_segmentation", capture)
    with pytest.raises(Stop):
        jobs.run_finetune(_job_context(job_dir))
    assert configs == [FinetuneConfig(**settings, seed=11)]


def test_the_evaluate_job_reports_the_dice_of_the_classes_not_the_background(oblique, tmp_path, monkeypatch):
    """A model that finds the front half of the blob scores Dice 2/3 on its one class; the report lists that value
    (class 1), not the background's (near 1), for the base and the adapted model alike."""
    import medgen.adapt.jobs as jobs

    torch.manual_seed(0)
    save_model(UNet(**TINY_UNET_KWARGS), tiny_unet_spec(), tmp_path / "model")
    image, label = blob_case(0, oblique)
    half = label.as_tensor().clone()
    first = int(torch.nonzero(half[0])[:, 0].min())
    half[0, first:first + 4] = 0  # the 8-voxel blob loses its first 4 slices
    monkeypatch.setattr(jobs, "segment", lambda model, volume, device: MetaTensor(half, affine=volume.affine))
    inputs = {"model_folder": str(tmp_path / "model"), "image": str(save_volume(image, tmp_path / "i.nii.gz")),
              "reference": str(save_volume(label, tmp_path / "l.nii.gz", label=True))}
    report = jobs.run_evaluate(_job_context(write_job(tmp_path / "jobs", "evaluate", inputs, device="cpu")))
    assert report["classes"] == ["blob"]
    assert report["base_dice"] == report["adapted_dice"] == [pytest.approx(2 / 3)]
