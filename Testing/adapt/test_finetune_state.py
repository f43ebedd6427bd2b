"""What fine-tuning leaves behind: frozen statistics stay frozen, the validation score means the drawn
classes, a resumed run keeps its best state, a replaced head brings its own classes, adapter files are checked."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

import medgen.adapt.finetune as finetune
from medgen.adapt.finetune import FinetuneConfig, finetune_segmentation
from medgen.errors import BadInputError, CancelledError, ModelError
from medgen.models.segmentation import SegmentationModel, head_class_names, prepare_volume, relabel_by_name
from medgen.peft import inject, load_adapter, save_adapter
from medgen.progress import CallbackReporter
from medgen_testing import blob_case


def _batchnorm_model() -> SegmentationModel:
    """A tiny two-class UNet with BatchNorm (running statistics), on 16³ patches without resampling."""
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), num_res_units=0, norm="batch")
    return SegmentationModel(network, ["blob"], None, (16, 16, 16), None, lambda volume: volume, "tiny-bn")


def _running_means(network: nn.Module) -> list[torch.Tensor]:
    return [module.running_mean.clone() for module in network.modules() if isinstance(module, nn.BatchNorm3d)]


def _eval_output(network: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return network.eval()(torch.linspace(0, 1, 16**3).view(1, 1, 16, 16, 16))


def test_peft_keeps_frozen_batchnorm_statistics_and_full_finetuning_saves_them(oblique, tmp_path):
    pristine = _batchnorm_model().network.state_dict()
    for method in ("bitfit", "full"):
        model = _batchnorm_model()
        before = _running_means(model.network)
        inject(model.network, method)
        finetune_segmentation(model, [blob_case(0, oblique)], FinetuneConfig(steps=2, val_every=2, amp=False),
                              checkpoint_dir=tmp_path / method / "checkpoints")
        moved = [not torch.equal(a, b) for a, b in zip(before, _running_means(model.network))]
        # a partly frozen model trains in eval() mode (FSEFT); full fine-tuning in train() mode
        assert not any(moved) if method == "bitfit" else all(moved), method
        save_adapter(model.network, tmp_path / method / "adapter")
        base = _batchnorm_model().network
        base.load_state_dict(copy.deepcopy(pristine))
        load_adapter(base, tmp_path / method / "adapter")  # fits the pristine base in both cases
        assert torch.allclose(_eval_output(base), _eval_output(model.network), atol=1e-6), method


class _FixedPrediction(nn.Module):
    """Logits that always predict ``labels`` ``(D, H, W)`` among ``classes`` classes."""

    def __init__(self, labels: torch.Tensor, classes: int):
        super().__init__()
        self.register_buffer("logits", 10.0 * nn.functional.one_hot(labels, classes).permute(3, 0, 1, 2)[None].float())

    def forward(self, volume):
        return self.logits.expand(volume.shape[0], -1, -1, -1, -1)


def test_validation_dice_scores_only_the_classes_drawn_in_the_reference(oblique):
    image, label = blob_case(0, oblique)  # 24³, the user drew class 1 only
    names = ["blob", "organ b", "organ c"]  # a four-class base model
    missed, extra = torch.zeros_like(label[0]), label[0].clone()
    extra[:2, :2, :2] = 2  # also marks an organ the user did not draw
    scores = {}
    for case, prediction in (("perfect", label[0]), ("misses the blob", missed), ("blob and organ b", extra)):
        model = SegmentationModel(_FixedPrediction(prediction, 4), names, None, (24, 24, 24), None, lambda v: v, "fixed")
        prepared, reference = prepare_volume(model, image, label)
        scores[case] = finetune._validation_dice(model, prepared, reference, torch.device("cpu"))
    assert scores == {"perfect": 1.0, "misses the blob": 0.0, "blob and organ b": 1.0}


def _bitfit_blob_model() -> SegmentationModel:
    model = _batchnorm_model()
    inject(model.network, "bitfit")
    return model


def test_a_resumed_run_keeps_its_history_early_stopping_and_best_state(oblique, tmp_path, monkeypatch):
    dice_at_step = {1: 0.9, 2: 0.5, 3: 0.4, 4: 0.3}
    trained_to = []
    real_train = finetune.train_diffusion

    def recording_train(*args, **kwargs):
        result = real_train(*args, **kwargs)
        trained_to.append(result.step)
        return result

    monkeypatch.setattr(finetune, "train_diffusion", recording_train)
    monkeypatch.setattr(finetune, "_validation_dice", lambda *args: dice_at_step[trained_to[-1]])
    data, held_out = [blob_case(0, oblique)], blob_case(1, oblique)
    config = FinetuneConfig(steps=4, val_every=1, patience=10, amp=False)

    def trainable_state(model):
        return {name: p.detach().clone() for name, p in model.network.named_parameters() if p.requires_grad}

    whole = _bitfit_blob_model()
    uninterrupted = finetune_segmentation(whole, data, config, checkpoint_dir=tmp_path / "whole", validation=held_out)
    steps = []
    cancel_in_step_3 = CallbackReporter(lambda e: steps.append(e) if e["event"] == "progress" else None,
                                        should_stop=lambda: len(steps) >= 2)
    with pytest.raises(CancelledError):
        finetune_segmentation(_bitfit_blob_model(), data, config, checkpoint_dir=tmp_path / "cut", validation=held_out,
                              reporter=cancel_in_step_3)
    saved = json.loads((tmp_path / "cut" / finetune.STATE_FILE).read_text())
    assert [entry["step"] for entry in saved["history"]] == [1, 2] and saved["best_dice"] == 0.9
    resumed_model = _bitfit_blob_model()
    resumed = finetune_segmentation(resumed_model, data, config, checkpoint_dir=tmp_path / "cut", validation=held_out)
    assert resumed.history == uninterrupted.history and resumed.best_val_dice == 0.9
    best, again = trainable_state(whole), trainable_state(resumed_model)
    assert all(torch.equal(best[name], again[name]) for name in best)  # the step-1 state, kept across the resume

    # a run that stopped early stays stopped: running it again trains nothing and returns the same best state
    stopped = finetune_segmentation(_bitfit_blob_model(), data, FinetuneConfig(steps=4, val_every=1, patience=1, amp=False),
                                    checkpoint_dir=tmp_path / "early", validation=held_out)
    assert stopped.steps == 2
    trained_to.clear()
    rerun = finetune_segmentation(_bitfit_blob_model(), data, FinetuneConfig(steps=4, val_every=1, patience=1, amp=False),
                                  checkpoint_dir=tmp_path / "early", validation=held_out)
    assert trained_to == [] and (rerun.steps, rerun.history, rerun.best_val_dice) == (2, stopped.history, 0.9)


def test_a_finished_run_without_validation_opened_again_returns_its_trained_weights(oblique, tmp_path):
    # a job re-run on its folder: no step is left, and no best state stands in for the checkpoint
    config, data = FinetuneConfig(steps=2, val_every=2, lr=1e-2, amp=False), [blob_case(0, oblique)]
    first = _bitfit_blob_model()
    finetune_segmentation(first, data, config, checkpoint_dir=tmp_path)
    again = _bitfit_blob_model()
    untrained = {name: p.detach().clone() for name, p in again.network.named_parameters() if p.requires_grad}
    assert finetune_segmentation(again, data, config, checkpoint_dir=tmp_path).steps == 2
    trained = dict(first.network.named_parameters())
    reopened = {name: p for name, p in again.network.named_parameters() if p.requires_grad}
    assert all(torch.equal(trained[name], reopened[name]) for name in reopened)
    assert any(not torch.equal(untrained[name], reopened[name]) for name in reopened)


def test_a_damaged_run_state_is_a_clear_error(oblique, tmp_path):
    (tmp_path / finetune.STATE_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="use a new output folder"):
        finetune_segmentation(_bitfit_blob_model(), [blob_case(0, oblique)], FinetuneConfig(steps=1, amp=False),
                              checkpoint_dir=tmp_path)


def test_a_replaced_head_brings_its_classes(oblique, tmp_path):
    assert head_class_names(["liver", "spleen", "kidney"], {"head_rows": [0, 2]}) == ["spleen"]
    assert head_class_names(["liver"], {"head_out_channels": 3}) == ["class 1", "class 2"]
    assert head_class_names(["liver"], {"rank": 2}) == ["liver"]
    for options, message in (({"head_rows": [2, 0]}, "must start with 0"), ({"head_rows": [0, 4]}, r"channels 1..3"),
                             ({"head_out_channels": 1}, "at least 2")):
        with pytest.raises(BadInputError, match=message):
            head_class_names(["liver", "spleen", "kidney"], options)
    base = torch.tensor([[0, 1, 2, 3]])
    assert torch.equal(relabel_by_name(base, ["liver", "spleen", "kidney"], ["spleen"]), torch.tensor([[0, 0, 1, 0]]))

    # a four-class base whose head keeps background and 'spleen' trains on 0/1 label maps
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 4, 1))
    model = SegmentationModel(network, ["liver", "spleen", "kidney"], None, (16, 16, 16), None, lambda v: v, "toy")
    options = {"head": "2", "head_rows": [0, 2]}
    inject(model.network, "linear-probe", **options)
    model.class_names = head_class_names(model.class_names, options)
    result = finetune_segmentation(model, [blob_case(0, oblique)], FinetuneConfig(steps=2, val_every=2, amp=False),
                                   checkpoint_dir=tmp_path, validation=blob_case(1, oblique))
    assert model.num_classes == 2 and 0.0 <= result.best_val_dice <= 1.0


def test_adapter_files_of_the_wrong_kind_are_model_errors(oblique, tmp_path):
    model = _bitfit_blob_model()
    save_adapter(model.network, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = config_path.read_text()
    config_path.write_text(json.dumps("an adapter"))
    with pytest.raises(ModelError, match="must hold a JSON object"):
        load_adapter(_batchnorm_model().network, tmp_path / "adapter")
    config_path.write_text(config)
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({name: tensor.double() for name, tensor in tensors.items()}, str(weights))
    with pytest.raises(ModelError, match="is damaged"):  # the file no longer matches its recorded digest
        load_adapter(_batchnorm_model().network, tmp_path / "adapter")
    unrecorded = json.loads(config)
    del unrecorded["adapter_weights_sha256"]  # as in adapters saved before the digest was recorded
    config_path.write_text(json.dumps(unrecorded))
    with pytest.raises(ModelError, match="shapes and data types"):
        load_adapter(_batchnorm_model().network, tmp_path / "adapter")


def test_jobs_of_an_adapter_with_a_replaced_head_use_its_classes(oblique, tmp_path):
    from monai.networks.nets import SegResNet

    from medgen.io import save_volume
    from medgen.jobs.exit_codes import ExitCode
    from medgen.models import ModelSpec, Preprocessing, save_model
    from medgen.slicer.runner import run_job_blocking, write_job

    kwargs = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]}
    torch.manual_seed(0)
    save_model(SegResNet(**kwargs), ModelSpec(network="SegResNet", kwargs=kwargs, class_names=["background", "liver", "spleen"],
                                              output_activation="softmax", name="three-class",
                                              preprocessing=Preprocessing(patch_size=[16, 16, 16])), tmp_path / "base")
    image, label = blob_case(0, oblique)  # label 1: here the spleen, in the adapted head's numbering
    paths = {"image": str(save_volume(image, tmp_path / "i.nii.gz")), "label": str(save_volume(label, tmp_path / "l.nii.gz", label=True))}
    base = {"model_folder": str(tmp_path / "base")}
    tuned = run_job_blocking(write_job(tmp_path / "jobs", "finetune", {**base, "images": [paths["image"]], "labels": [paths["label"]]},
                                       {"method": "linear-probe", "method_options": {"head": "conv_final.2.conv", "head_rows": [0, 2]},
                                        "steps": 2, "val_every": 2}, device="cpu"), timeout_s=300)
    assert tuned.returncode == ExitCode.OK, tuned.error
    adapter = tuned.result["outputs"]["adapter"]
    infer = run_job_blocking(write_job(tmp_path / "jobs", "infer", {**base, "image": paths["image"], "adapter": adapter}), timeout_s=300)
    assert infer.returncode == ExitCode.OK, infer.error
    named = json.loads(open(infer.result["outputs"]["labels"]).read())
    assert [(entry["name"], entry["value"]) for entry in named] == [("spleen", 1)]
    evaluate = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {**base, "image": paths["image"], "reference": paths["label"],
                                                                          "adapter": adapter}), timeout_s=300)
    assert evaluate.returncode == ExitCode.OK, evaluate.error
    assert evaluate.result["classes"] == ["spleen"] and len(evaluate.result["base_dice"]) == len(evaluate.result["adapted_dice"]) == 1
    # without the adapter the label map draws the liver (1) only: the spleen gets no score, not a Dice of 0
    base_only = run_job_blocking(write_job(tmp_path / "jobs", "evaluate", {**base, "image": paths["image"],
                                                                           "reference": paths["label"]}), timeout_s=300)
    assert base_only.result["classes"] == ["liver", "spleen"]
    assert base_only.result["base_dice"][1] is None and isinstance(base_only.result["base_dice"][0], float)
    wrong = run_job_blocking(write_job(tmp_path / "jobs", "finetune", {**base, "images": [paths["image"]], "labels": [paths["label"]]},
                                       {"method": "linear-probe", "method_options": {"head": "conv_final.2.conv", "head_rows": [2, 0]}}),
                             timeout_s=300)
    assert wrong.returncode == ExitCode.BAD_INPUT and "must start with 0 (the background channel)" in wrong.error["message"]


def test_intensity_normalisations_follow_the_spec_formulas():
    from medgen.models.segmentation import _intensity_normalizer

    ct = torch.linspace(-1000.0, 1000.0, 8 * 8 * 8).view(8, 8, 8)  # HU
    windowed = _intensity_normalizer({"method": "range", "a_min": -175, "a_max": 250, "b_min": 0.0, "b_max": 1.0})(ct)
    expected = ((ct.clamp(-175, 250) + 175) / 425)
    assert torch.allclose(windowed, expected, atol=1e-6)
    scaled = _intensity_normalizer({"method": "percentile", "lower": 0.0, "upper": 100.0})(ct)
    assert float(scaled.min()) == 0.0 and float(scaled.max()) == 1.0
    low, high = torch.quantile(ct.flatten(), torch.tensor([0.25, 0.75]))
    middle = _intensity_normalizer({"method": "percentile", "lower": 25, "upper": 75})(ct)
    assert torch.allclose(middle, ((ct - low) / (high - low)).clamp(0, 1), atol=1e-5)  # both percentiles are the spec's
    brain = torch.zeros(8, 8, 8)
    brain[2:6, 2:6, 2:6] = torch.linspace(100.0, 300.0, 64).view(4, 4, 4)
    before = brain.clone()
    normalised = _intensity_normalizer({"method": "zscore", "nonzero": True})(brain)
    assert torch.equal(brain, before)  # MONAI normalises nonzero voxels in place: the caller's volume must not change
    inside = normalised[2:6, 2:6, 2:6]
    assert abs(float(inside.mean())) < 1e-5 and abs(float(inside.std(unbiased=False)) - 1) < 1e-4
    assert float(normalised[0].abs().max()) == 0.0  # the background stays 0


def test_a_volume_with_nan_and_a_validation_map_lost_on_the_network_grid_are_refused(oblique):
    from monai.data import MetaTensor

    from medgen.models.segmentation import prepare_volume

    model = _batchnorm_model()
    image, label = blob_case(0, oblique)
    holed = image.clone()
    holed[0, 3, 3, 3] = float("nan")
    with pytest.raises(BadInputError, match="holds NaN or infinite voxels"):
        prepare_volume(model, holed)
    # one corner voxel of 24³ drawn: nearest-neighbour resizing to an 8³ network input samples every third voxel
    model.input_size = (8, 8, 8)
    speck = torch.zeros_like(label.as_tensor())
    speck[0, 0, 0, 0] = 1
    speck = MetaTensor(speck, affine=label.affine)
    assert not bool((prepare_volume(model, image, speck)[1] > 0).any())
    with pytest.raises(BadInputError, match="keeps no labelled voxel on tiny-bn's grid"):
        finetune_segmentation(model, [(image, label)], FinetuneConfig(steps=1, amp=False), checkpoint_dir=None,
                              validation=(image, speck))


def test_the_spec_orientation_decides_the_network_axes(oblique, tmp_path):
    from monai.data import MetaTensor

    from medgen.models.segmentation import prepare_volume

    volume = MetaTensor(torch.arange(16 * 16 * 16, dtype=torch.float32).view(1, 16, 16, 16), affine=torch.eye(4, dtype=torch.float64))
    tensors = {}
    for codes in ("RAS", "LPS"):
        model = SegmentationModel(nn.Identity(), ["x"], None, (16, 16, 16), None, lambda v: v, "id", codes)
        tensors[codes] = prepare_volume(model, volume)[0].tensor[0, 0]
    assert torch.equal(tensors["LPS"], tensors["RAS"].flip(0).flip(1))


@pytest.mark.parametrize("method", ["bitfit", "full"])
def test_early_stopping_hands_back_the_network_of_the_best_validation(oblique, tmp_path, monkeypatch, method):
    """The validation Dice dips, peaks at the third of five checks, then falls: the dip's stale count is reset by the
    peak (so two worse checks after it stop the run at step 5, not 4), and the returned network is the one validated at
    the peak, not the last step's: its trainable parameters and, under full fine-tuning (``train()`` mode), its
    BatchNorm running statistics too."""
    dice_of_check = [0.5, 0.4, 0.9, 0.3, 0.2, 0.1]
    validated = []  # the whole network state at each validation

    def scripted_dice(model, *args):
        validated.append({name: tensor.detach().clone() for name, tensor in model.network.state_dict().items()})
        return dice_of_check[len(validated) - 1]

    monkeypatch.setattr(finetune, "_validation_dice", scripted_dice)
    model = _batchnorm_model()
    inject(model.network, method)
    result = finetune_segmentation(model, [blob_case(0, oblique)], FinetuneConfig(steps=6, val_every=1, patience=2, amp=False),
                                   checkpoint_dir=tmp_path, validation=blob_case(1, oblique))
    assert (result.steps, result.best_val_dice, len(validated)) == (5, 0.9, 5)
    peak, last = validated[2], validated[4]
    moved = [name for name in peak if not torch.equal(peak[name], last[name])]
    # training went on after the peak (in full fine-tuning, BatchNorm statistics included)...
    assert moved and (method == "bitfit" or any(name.endswith("running_mean") for name in moved)), moved
    # ... and the run hands back the peak's network
    final = model.network.state_dict()
    assert sorted(final) == sorted(peak)
    assert [name for name in final if not torch.equal(final[name], peak[name])] == []


def test_the_learning_rate_decays_along_a_half_cosine(oblique, tmp_path):
    """AdamW starts at ``lr`` and decays to 0 at ``steps`` along lr/2·(1 + cos(pi·step/steps)), as the progress events
    report it after each step."""
    rates = []
    reporter = CallbackReporter(lambda e: rates.append(e["lr"]) if e["event"] == "progress" and "lr" in e else None)
    finetune_segmentation(_bitfit_blob_model(), [blob_case(0, oblique)], FinetuneConfig(steps=4, val_every=4, lr=1e-2, amp=False),
                          checkpoint_dir=tmp_path, reporter=reporter)
    assert rates == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in range(1, 5)], abs=1e-12)


def test_the_training_loss_is_the_dice_loss_of_softmax_probabilities(oblique, tmp_path):
    """The loss of a one-step run (on a patch as large as the volume, so the whole volume) is MONAI's Dice loss of the
    softmax of the starting network's logits against the one-hot label: the channels compete (softmax), not each one
    alone (sigmoid)."""
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    network = nn.Conv3d(1, 2, 1)
    model = SegmentationModel(network, ["blob"], None, (24, 24, 24), None, lambda v: v, "conv")
    image, label = blob_case(0, oblique)
    prepared, reference = prepare_volume(model, image, label)
    with torch.no_grad():
        logits = network(prepared.tensor)
        expected = float(DiceLoss(to_onehot_y=True, softmax=True)(logits, reference))
        sigmoid = float(DiceLoss(to_onehot_y=True, sigmoid=True)(logits, reference))
    assert abs(expected - sigmoid) > 1e-3  # the case tells the two apart
    inject(model.network, "full")
    result = finetune_segmentation(model, [(image, label)], FinetuneConfig(steps=1, val_every=1, amp=False), checkpoint_dir=tmp_path)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_spec_spacing_resamples_the_volume_and_its_label_by_nearest_neighbour(tmp_path):
    """A model folder whose spec asks for 2 x 2 x 1.5 mm voxels gets a 1 mm 32³ volume on that grid (16 x 16 x 22), and
    its label map is resampled by nearest neighbour: the 1.5 mm axis falls between voxels, where interpolating would
    invent values between 0 and 3."""
    from monai.data import MetaTensor

    from medgen.models.segmentation import load_segmentation_model
    from medgen.models import Preprocessing, save_model
    from medgen_testing import TINY_UNET_KWARGS, tiny_unet_spec

    torch.manual_seed(0)
    spec = tiny_unet_spec(preprocessing=Preprocessing(intensity={"method": "percentile"}, spacing_mm=[2.0, 2.0, 1.5],
                                                      patch_size=[16, 16, 16]))
    save_model(UNet(**TINY_UNET_KWARGS), spec, tmp_path / "model")
    model = load_segmentation_model(str(tmp_path / "model"))
    assert model.spacing_mm == (2.0, 2.0, 1.5)
    label = torch.zeros(1, 32, 32, 32)
    label[0, 5:20, 7:23, 9:25] = 3
    label[0, 10:14, 10:14, 10:14] = 0
    image = label / 3 + 0.05 * torch.rand(1, 32, 32, 32)
    one_mm = torch.eye(4, dtype=torch.float64)
    prepared, resampled = prepare_volume(model, MetaTensor(image, affine=one_mm), MetaTensor(label, affine=one_mm))
    assert prepared.tensor.shape == resampled.shape == (1, 1, 16, 16, 22)
    assert set(torch.unique(resampled).tolist()) == {0, 3}


def test_labels_of_a_cube_in_lps_order_come_back_on_its_own_voxels():
    """A cubic volume stored in LPS order is flipped to RAS for the network; its labels must be flipped back even though
    the shape did not change. The network here labels the bright voxels, so the labels equal the off-centre blob."""
    from monai.data import MetaTensor

    from medgen.models.segmentation import segment

    class Threshold(nn.Module):
        def forward(self, volume):
            return 10.0 * torch.cat([0.5 - volume, volume - 0.5], dim=1)

    blob = torch.zeros(1, 16, 16, 16)
    blob[0, 2:6, 3:8, 9:13] = 1.0
    lps = torch.diag(torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    model = SegmentationModel(Threshold(), ["blob"], None, (16, 16, 16), None, lambda v: v, "threshold")
    labels = segment(model, MetaTensor(blob, affine=lps))
    assert torch.equal(labels.as_tensor(), blob.long()) and torch.allclose(labels.affine, lps)


def test_a_fixed_input_size_takes_the_nearest_voxels():
    """A network with a fixed input grid (deepbet's 128³) gets the volume resized by nearest neighbour: halving a 16³
    volume picks every second voxel (voxel 2i+1, the nearest to the new voxel's centre), it does not average them."""
    from monai.data import MetaTensor

    volume = torch.arange(16.0**3).view(1, 16, 16, 16)
    model = SegmentationModel(nn.Identity(), ["x"], (8, 8, 8), (8, 8, 8), None, lambda v: v, "fixed-grid")
    prepared, _ = prepare_volume(model, MetaTensor(volume, affine=torch.eye(4, dtype=torch.float64)))
    assert torch.equal(prepared.tensor[0], volume[:, 1::2, 1::2, 1::2])


def test_overlapping_windows_are_blended_with_gaussian_weights():
    """Two 16-voxel windows cover a 24-voxel axis and overlap on voxels 8..15. Each window's logit is its own mean
    intensity (an intensity ramp makes the second window's larger); with Gaussian blending a voxel of the overlap leans
    towards the window whose centre is nearer, so the probability rises across the overlap instead of being flat."""
    from medgen.models.segmentation import predict_probabilities

    class WindowMean(nn.Module):
        def forward(self, window):
            mean = window.mean(dim=(2, 3, 4), keepdim=True).expand_as(window)
            return torch.cat([torch.zeros_like(window), mean], dim=1)

    ramp = torch.linspace(0.0, 1.0, 24).view(1, 1, 24, 1, 1).expand(1, 1, 24, 16, 16).contiguous()
    model = SegmentationModel(WindowMean(), ["x"], None, (16, 16, 16), None, lambda v: v, "window-mean")
    along = predict_probabilities(model, ramp, torch.device("cpu"))[0, 1, :, 8, 8]
    first, second = torch.sigmoid(ramp[0, 0, :16].mean()), torch.sigmoid(ramp[0, 0, 8:].mean())
    assert torch.allclose(along[:8], first.expand(8)) and torch.allclose(along[16:], second.expand(8))
    overlap = along[8:16]
    assert bool((overlap[1:] > overlap[:-1] + 1e-4).all()) and first < overlap.min() and overlap.max() < second
