"""Joint image+label LDM end to end on tiny data: training stages, resume, generation, jobs, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from monai.data import MetaTensor
from safetensors.torch import load_file

from medgen.errors import BadInputError, CancelledError, ModelError
from medgen.io import check_same_geometry, load_volume, save_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.labels import LabelInfo
from medgen.progress import CallbackReporter
from medgen.slicer.runner import run_job_blocking, write_job
from medgen.synthesis.joint_ldm import JointLDMConfig, generate_pairs, train_joint_ldm, write_generated_pairs
from medgen.synthesis.prepare import prepare_pairs
from medgen_testing import oblique_affine, verify_nnunet_dataset

FAST = dict(vae_phase1_steps=4, vae_phase2_steps=2, ldm_steps=4, checkpoint_every=2)
LABELS = [LabelInfo("cavity", 1, (1.0, 0.0, 0.0)), LabelInfo("wall", 2, (0.0, 1.0, 0.0))]


def _phantom(seed: int, oblique):
    """A dark ellipsoid cavity (label 1) in a bright shell (label 2), 16³ (spec C.9 item 10 style)."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    radius = (grid.pow(2) / torch.tensor([0.5, 0.4, 0.45]).view(3, 1, 1, 1).pow(2)).sum(0).sqrt()
    label = torch.zeros(16, 16, 16, dtype=torch.int64)
    label[radius < 1.4] = 2
    label[radius < 0.9] = 1
    image = torch.where(label == 1, 0.2, torch.where(label == 2, 0.8, 0.05)) * (1 + 0.1 * torch.randn((16, 16, 16), generator=generator))
    affine = torch.from_numpy(oblique)
    return MetaTensor(image.clamp(0, 1)[None], affine=affine), MetaTensor(label[None], affine=affine)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    pairs, labels = prepare_pairs([(f"c{i}", *_phantom(i, oblique_affine())) for i in range(2)], shape=(16, 16, 16), labels=LABELS)
    torch.manual_seed(0)
    model_dir = train_joint_ldm(pairs, labels, tmp_path_factory.mktemp("model"), JointLDMConfig.tiny(**FAST))
    return model_dir, pairs


def test_training_writes_a_complete_model_folder(trained_model):
    model_dir, _ = trained_model
    document = json.loads((model_dir / "medgen_model.json").read_text())
    assert document["task"] == "joint-image-label-ldm" and document["num_classes"] == 3
    assert [entry["name"] for entry in document["labels"]] == ["cavity", "wall"]
    for name in ("vae.safetensors", "ldm.safetensors", "latents.safetensors"):
        assert (model_dir / name).is_file()


def test_training_again_resumes_and_skips_finished_stages(trained_model):
    model_dir, pairs = trained_model
    phases = []
    reporter = CallbackReporter(lambda e: phases.append((e["phase"], e["step"])) if e["event"] == "progress" else None)
    train_joint_ldm(pairs, [LabelInfo("cavity", 1, (1, 0, 0)), LabelInfo("wall", 2, (0, 1, 0))], model_dir, JointLDMConfig.tiny(**FAST), reporter=reporter)
    assert not any(phase == "latents" for phase, _ in phases)  # latents already exported
    assert not any(phase in ("vae", "ldm") for phase, _ in phases)  # both networks had finished: nothing trains again
    # the VAE's last checkpoint is after both of its phases (w_KL = 1e-6, then 1), the LDM's after its steps
    latest = {stage: json.loads((model_dir / stage / "latest.json").read_text())["step"] for stage in ("vae", "ldm")}
    assert latest == {"vae": FAST["vae_phase1_steps"] + FAST["vae_phase2_steps"], "ldm": FAST["ldm_steps"]}


def test_training_again_with_other_settings_or_data_is_refused_before_any_stage(trained_model):
    model_dir, pairs = trained_model
    labels = [LabelInfo("cavity", 1, (1, 0, 0)), LabelInfo("wall", 2, (0, 1, 0))]
    before = {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()}
    with pytest.raises(BadInputError, match=r"other settings or data \(vae_phase1_steps 4 -> 5\).*Use a new output folder"):
        train_joint_ldm(pairs, labels, model_dir, JointLDMConfig.tiny(**{**FAST, "vae_phase1_steps": 5}))
    with pytest.raises(BadInputError, match=r"other settings or data \(seed 0 -> 7\)"):
        train_joint_ldm(pairs, labels, model_dir, JointLDMConfig.tiny(**FAST), seed=7)
    flipped = [dataclasses.replace(pair, image=MetaTensor(pair.image.flip(1), affine=pair.image.affine)) for pair in pairs]
    with pytest.raises(BadInputError, match=r"\(other training data\)"):
        train_joint_ldm(flipped, labels, model_dir, JointLDMConfig.tiny(**FAST))
    assert {path.name: path.stat().st_mtime_ns for path in model_dir.iterdir()} == before  # nothing was touched


def test_the_seed_decides_the_weights_and_the_model_records_its_trained_steps(trained_model, tmp_path):
    """The seed reaches the initial weights and the training draws whatever the global generator holds; a folder asked
    for fewer LDM steps than it was trained keeps and records its longer training."""
    model_dir, pairs = trained_model
    config = JointLDMConfig.tiny(**FAST)
    runs = {}
    for name, seed, global_seed in (("a", 3, 0), ("b", 3, 99), ("c", 4, 0)):
        torch.manual_seed(global_seed)
        runs[name] = load_file(train_joint_ldm(pairs, LABELS, tmp_path / name, config, seed=seed) / "ldm.safetensors")
    assert all(torch.equal(runs["a"][key], runs["b"][key]) for key in runs["a"])
    assert not all(torch.equal(runs["a"][key], runs["c"][key]) for key in runs["a"])
    assert json.loads((tmp_path / "a" / "medgen_model.json").read_text())["seed"] == 3
    train_joint_ldm(pairs, LABELS, tmp_path / "a", JointLDMConfig.tiny(**{**FAST, "ldm_steps": 2}), seed=3)
    assert json.loads((tmp_path / "a" / "medgen_model.json").read_text())["config"]["ldm_steps"] == 4


def test_the_latent_ddpm_trains_on_fresh_posterior_draws(trained_model, tmp_path, monkeypatch):
    """Dynamic sampling: each LDM step trains on a new draw mu + sigma·eps of the case's posterior (normalised), not on
    its fixed mean: every step's target lies near one case's (normalised) mean but is none of them."""
    import shutil

    import medgen.synthesis.joint_ldm as joint_ldm
    from medgen.models.weights import read_safetensors
    from medgen.synthesis.latents import LatentSet

    model_dir, pairs = trained_model
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    shutil.rmtree(folder / "ldm")  # only the LDM stage runs again
    targets = []
    real_loss = joint_ldm.noise_prediction_loss
    monkeypatch.setattr(joint_ldm, "noise_prediction_loss", lambda denoiser, scheduler, x0, **kwargs: targets.append(x0.clone())
                        or real_loss(denoiser, scheduler, x0, **kwargs))
    train_joint_ldm(pairs, LABELS, folder, JointLDMConfig.tiny(**FAST))
    latents = LatentSet.from_state(read_safetensors(folder / "latents.safetensors"))
    means = latents.normalize(latents.mu)
    assert len(targets) == FAST["ldm_steps"] and all(x0.shape == (1, *means.shape[1:]) for x0 in targets)
    assert not any(torch.equal(x0[0], mean) for x0 in targets for mean in means)
    # each draw is near one case's mean (within a few posterior standard deviations, on the normalised scale)
    spread = 2 * 5 * float(latents.sigma.max()) / (latents.g_max - latents.g_min)
    assert all(min(float((x0[0] - mean).abs().max()) for mean in means) < spread for x0 in targets)


def test_generated_pairs_are_valid_aligned_and_deterministic(trained_model):
    model_dir, pairs = trained_model
    first = list(generate_pairs(model_dir, 2, seed=5, steps=5))
    again = list(generate_pairs(model_dir, 2, seed=5, steps=5))
    assert len(first) == 2
    for (image, label), (image2, label2) in zip(first, again):
        assert torch.equal(image, image2) and torch.equal(label, label2)
        assert image.shape == label.shape == (1, 16, 16, 16)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert set(torch.unique(label).tolist()) <= {0, 1, 2}
        check_same_geometry(image, label)
        assert torch.allclose(image.affine, pairs[0].image.affine)


def test_generation_decodes_the_sampled_latents_mapped_back_to_the_latent_range(trained_model, monkeypatch):
    """The latent DDPM works on latents normalised to [-1, 1]; the VAE must decode a sample only after it is mapped back
    (denormalised) to the range of the training posteriors."""
    import medgen.synthesis.joint_ldm as joint_ldm
    from medgen.models.weights import read_safetensors
    from medgen.synthesis.latents import LatentSet

    model_dir, _ = trained_model
    sampled, decoded = [], []
    real_sample, real_decode = joint_ldm.sample, joint_ldm.decode_pair
    monkeypatch.setattr(joint_ldm, "sample", lambda *args, **kwargs: sampled.append(real_sample(*args, **kwargs)) or sampled[-1])
    monkeypatch.setattr(joint_ldm, "decode_pair", lambda vae, latent: decoded.append(latent) or real_decode(vae, latent))
    assert len(list(generate_pairs(model_dir, 1, seed=5, steps=5))) == 1
    latents = LatentSet.from_state(read_safetensors(model_dir / "latents.safetensors"))
    assert len(sampled) == len(decoded) == 1
    assert torch.allclose(decoded[0], latents.denormalize(sampled[0]))
    assert not torch.allclose(decoded[0], sampled[0], atol=1e-2)  # the mapping is not the identity here


def test_zero_pairs_is_fine(trained_model):
    assert list(generate_pairs(trained_model[0], 0)) == []


def test_cancelled_generation_keeps_finished_pairs(trained_model, tmp_path):
    model_dir, _ = trained_model
    pairs_made = []
    reporter = CallbackReporter(lambda e: pairs_made.append(e["step"]) if e.get("phase") == "pairs" else None, should_stop=lambda: len(pairs_made) >= 2)
    with pytest.raises(CancelledError):
        write_generated_pairs(model_dir, 10, tmp_path, steps=4, reporter=reporter)
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["labels.json", "syn_0000_image.nii.gz", "syn_0000_label.nii.gz", "syn_0001_image.nii.gz", "syn_0001_label.nii.gz"]
    load_volume(tmp_path / "syn_0001_label.nii.gz", label=True)


def test_model_folder_of_another_task_is_refused(tmp_path):
    (tmp_path / "medgen_model.json").write_text(json.dumps({"task": "lmi-translation"}))
    with pytest.raises(ModelError, match="'lmi-translation'"):
        list(generate_pairs(tmp_path, 1))


def test_synth_jobs_through_the_worker_export_nnunet(tmp_path, oblique, trained_model):
    for case in range(2):
        image, label = _phantom(case, oblique)
        save_volume(image, tmp_path / f"c{case}_0000.nii.gz")
        save_volume(label, tmp_path / f"c{case}.nii.gz", label=True)
    # an nnU-Net raw folder names its structures in dataset.json (v1 form here): no label_names file needed
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "cavity", "2": "wall"}}))
    train = run_job_blocking(write_job(
        tmp_path / "jobs", "synth-train", {"folder": str(tmp_path)},
        {"shape": [16, 16, 16], "preset": "tiny", **FAST}, device="cpu"), timeout_s=600)
    assert train.returncode == ExitCode.OK, train.error
    phases = {event["phase"] for event in train.events if event["event"] == "progress"}
    assert {"vae", "latents", "ldm"} <= phases
    synth = run_job_blocking(write_job(
        tmp_path / "jobs", "synthesize", {"model": train.result["outputs"]["model"]},
        {"count": 2, "steps": 4, "nnunet_dataset_id": 42, "nnunet_name": "Phantoms"}, device="cpu", seed=1), timeout_s=600)
    assert synth.returncode == ExitCode.OK, synth.error
    dataset = synth.result["outputs"]["nnunet_dataset"]
    assert json.loads(open(f"{dataset}/dataset.json").read())["labels"] == {"background": 0, "cavity": 1, "wall": 2}
    verify_nnunet_dataset(dataset)


def test_training_pairs_of_different_geometry_are_bad_input(tmp_path, oblique):
    image, label = _phantom(0, oblique)
    save_volume(image, tmp_path / "a_0000.nii.gz")
    shifted = oblique.copy()
    shifted[2, 3] += 4.0
    save_volume(MetaTensor(label.as_tensor(), affine=torch.from_numpy(shifted)), tmp_path / "a.nii.gz", label=True)
    job = run_job_blocking(write_job(tmp_path / "jobs", "synth-train", {"folder": str(tmp_path)}, {"shape": [16, 16, 16], **FAST}), timeout_s=300)
    assert job.returncode == ExitCode.BAD_INPUT
    assert "a image and a label" in job.error["message"]


def test_a_single_training_case_trains_with_a_warning(tmp_path):
    pairs, labels = prepare_pairs([("only", *_phantom(0, oblique_affine()))], shape=(16, 16, 16), labels=LABELS)
    logs = []
    reporter = CallbackReporter(lambda e: logs.append(e) if e["event"] == "log" else None)
    train_joint_ldm(pairs, labels, tmp_path / "model", JointLDMConfig.tiny(vae_phase1_steps=1, vae_phase2_steps=0, ldm_steps=1), reporter=reporter)
    assert any(e["level"] == "warning" and "one training case" in e["message"] for e in logs)
    assert (tmp_path / "model" / "medgen_model.json").is_file()


def test_label_maps_without_any_label_are_refused_and_absent_labels_warned(tmp_path):
    image, label = _phantom(0, oblique_affine())
    blank = MetaTensor(torch.zeros_like(label.as_tensor()), affine=label.affine)
    pairs, labels = prepare_pairs([("a", image, blank), ("b", image, blank)], shape=(16, 16, 16), labels=LABELS)
    with pytest.raises(BadInputError, match="No training label map holds a labelled voxel"):
        train_joint_ldm(pairs, labels, tmp_path / "blank", JointLDMConfig.tiny(**FAST))
    assert not (tmp_path / "blank").exists()
    cavity_only = MetaTensor(torch.where(label.as_tensor() == 1, 1, 0), affine=label.affine)
    pairs, labels = prepare_pairs([("a", image, cavity_only)], shape=(16, 16, 16), labels=LABELS)
    logs = []
    reporter = CallbackReporter(lambda e: logs.append(e["message"]) if e["event"] == "log" else None)
    train_joint_ldm(pairs, labels, tmp_path / "model", JointLDMConfig.tiny(vae_phase1_steps=1, vae_phase2_steps=0, ldm_steps=1), reporter=reporter)
    assert any("Labels ['wall'] occur in no training label map" in message for message in logs)
