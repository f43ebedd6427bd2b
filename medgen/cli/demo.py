"""The README demo: every MedGen step on the offline sample subject, on CPU in minutes.

Every step runs as a job through the worker process, exactly as the Slicer modules run it:
1. ``selftest``: read a volume, compute on the chosen device, write a volume;
2. adaptation: fine-tune the real pretrained deepbet brain-extraction network (weights from the deepbet
   wheel) to a SIMULATED T2 contrast with a simulated scalp, using TenVOO-L adapters, and print Dice
   on a held-out volume before and after;
3. paired synthesis: train a *tiny* joint image+label diffusion model on augmented copies of the sample
   subject (minutes on CPU; toy quality), generate pairs and export them as an nnU-Net v2 dataset;
4. translation: train a *tiny* 2.5D LMI-conditioned DDPM on the real T1 only (about two minutes on CPU; toy
   quality), translate the SIMULATED PD volume into T1 zero-shot, and print how well the output's local
   structure agrees with its source and with an unrelated source;
5. mask-conditioned synthesis: train a *tiny* MRGen-style model (VAE, prompt-conditioned latent UNet,
   ControlNet, checker) from T1 volumes with tissue labels and SIMULATED T2 volumes without labels, render
   SIMULATED-T2 images of held-out tissue label maps, and print how many candidates the checker accepted.
"""

from __future__ import annotations

import sys
from pathlib import Path

from medgen.io.atomic import ensure_folder
from medgen.jobs.exit_codes import ExitCode


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(out_dir: Path, device: str = "auto", size: str = "tiny", verbose: bool = False) -> int:
    """The README demo on the sample subject; ``verbose`` shows the jobs' info-level log lines (``medgen -v demo``)."""
    from medgen.cli.main import _run_job_dir
    from medgen.data.samples import load_sample_case, write_sample_case
    from medgen.slicer.runner import write_job

    ensure_folder(out_dir)
    _say(f"writing the sample subject ({size} grid) to {out_dir / 'sample'}")
    _say("  t1 = real MNI152 T1 template; t2_simulated/pd_simulated = SIMULATED contrasts from its tissue maps")
    paths = write_sample_case(load_sample_case(size), out_dir / "sample")

    _say("step 1: selftest job (read volume -> torch on the chosen device -> write volume) through the worker")
    job_dir = write_job(out_dir / "jobs", "selftest", {"image": str(paths["t1"])}, {"steps": 10}, device=device)
    code = _run_job_dir(job_dir, verbose)
    if code != ExitCode.OK:
        _say(f"selftest failed with exit code {code}; see {job_dir / 'events.jsonl'}")
        return code
    _say(f"selftest output: {job_dir / 'outputs' / 'selftest.nii.gz'} (manifest: {job_dir / 'manifest.json'})")

    code = _adaptation_step(out_dir, device, verbose)
    if code != ExitCode.OK:
        return code
    code = _paired_synthesis_step(out_dir, paths, device, verbose)
    if code != ExitCode.OK:
        return code
    code = _translation_step(out_dir, device, verbose)
    if code != ExitCode.OK:
        return code
    code = _mask_synthesis_step(out_dir, device, verbose)
    if code != ExitCode.OK:
        return code
    _say(f"done. Everything is under {out_dir}")
    return 0


def _adaptation_step(out_dir: Path, device: str, verbose: bool = False) -> int:
    import json

    from medgen.cli.main import _run_job_dir
    from medgen.slicer.runner import write_job

    _say("step 2: adapt the pretrained deepbet brain-extraction network (trained on T1) to a new contrast")
    _say("  with TenVOO-L adapters; the contrast is a SIMULATED T2 with a simulated scalp (4 mm grid)")
    files = adaptation_cases(out_dir / "adaptation")
    finetune = write_job(out_dir / "jobs", "finetune", {
        "images": [files["train_a"][0], files["train_b"][0]], "labels": [files["train_a"][1], files["train_b"][1]],
        "val_image": files["validation"][0], "val_label": files["validation"][1]},
        {"model": "deepbet", "method": "tenvoo-l", "method_options": {"rank": 4}, "steps": 16, "lr": 1e-3, "val_every": 8},
        device=device)
    code = _run_job_dir(finetune, verbose)
    if code != ExitCode.OK:
        return code
    evaluate = write_job(out_dir / "jobs", "evaluate", {
        "image": files["held_out"][0], "reference": files["held_out"][1], "adapter": str(finetune / "outputs" / "adapter")},
        device=device)
    code = _run_job_dir(evaluate, verbose)
    if code == ExitCode.OK:
        report = json.loads((evaluate / "outputs" / "evaluation.json").read_text())
        _say(f"held-out brain Dice: deepbet as shipped {report['base_dice'][0]:.4f} -> with TenVOO-L adapter {report['adapted_dice'][0]:.4f}")
        _say(f"adapter: {finetune / 'outputs' / 'adapter'} (report: {finetune / 'outputs' / 'finetune_report.json'})")
    return code


def adaptation_cases(folder: Path) -> dict[str, tuple[str, str]]:
    """The adaptation task's (image, brain mask) files by role: ``train_a``, ``train_b``, ``validation``, ``held_out``.

    SIMULATED T2 with a simulated scalp on the 4 mm grid, one noise/bias draw per role; the held-out case is
    also mirrored left-right. All are the one template subject (nearly symmetric, so even the mirrored brain
    mask matches): the task is adapting to a new contrast, not to new anatomy.
    """
    import torch
    from monai.data import MetaTensor

    from medgen.data.samples import load_sample_case, with_simulated_head
    from medgen.io import save_volume

    files = {}
    for role, seed, mirrored in (("train_a", 1, False), ("train_b", 2, False), ("validation", 4, False), ("held_out", 3, True)):
        case = load_sample_case("small", seed=seed)
        image, mask = with_simulated_head(case.t2_simulated, case.brain_mask, seed=seed), case.brain_mask
        if mirrored:
            image, mask = (MetaTensor(torch.flip(v.as_tensor(), dims=[1]), affine=v.affine) for v in (image, mask))
        files[role] = (str(save_volume(image, folder / f"{role}_t2_simulated.nii.gz")),
                       str(save_volume(mask, folder / f"{role}_brain_mask.nii.gz", label=True)))
    return files


def _augmented_training_pairs(paths: dict, folder: Path) -> Path:
    """Four training pairs from the one sample subject: as is, mirrored left-right, shifted by ±2 voxels."""
    import torch
    from monai.data import MetaTensor

    from medgen.io import load_volume, save_volume

    image, label = load_volume(paths["t1"]), load_volume(paths["tissue_labels"], label=True)
    variants = {
        "orig": lambda v: v,
        "flip": lambda v: torch.flip(v, dims=[1]),
        "up": lambda v: torch.roll(v, shifts=2, dims=3),
        "down": lambda v: torch.roll(v, shifts=-2, dims=3),
    }
    for name, change in variants.items():
        save_volume(MetaTensor(change(image.as_tensor()), affine=image.affine), folder / f"{name}_0000.nii.gz")
        save_volume(MetaTensor(change(label.as_tensor()), affine=label.affine), folder / f"{name}.nii.gz", label=True)
    return folder


def _paired_synthesis_step(out_dir: Path, paths: dict, device: str, verbose: bool = False) -> int:
    from medgen.cli.main import _run_job_dir
    from medgen.io import load_volume
    from medgen.slicer.runner import write_job

    _say("step 3: paired image+label synthesis (joint VAE + latent DDPM, DIFF-3 style)")
    _say("  training a TINY model on 4 augmented copies of the sample subject; on CPU this takes a few minutes")
    _say("  and gives toy-quality pairs: the point is the pipeline, not the images")
    grid = list(load_volume(paths["t1"]).shape[1:])
    grid = [size - size % 16 for size in grid]  # the joint VAE downsamples 8x, its latent UNet 2x more
    data = _augmented_training_pairs(paths, out_dir / "synthesis" / "training_pairs")
    train_dir = write_job(out_dir / "jobs", "synth-train", {"folder": str(data), "label_names": str(paths["labels"])},
                          {"shape": grid, "preset": "tiny"}, device=device)
    code = _run_job_dir(train_dir, verbose)
    if code != ExitCode.OK:
        return code
    synth_dir = write_job(out_dir / "jobs", "synthesize", {"model": str(train_dir / "outputs" / "model")},
                          {"count": 4, "batch_size": 4, "steps": 50, "nnunet_dataset_id": 900, "nnunet_name": "MedGenDemo"}, device=device)
    code = _run_job_dir(synth_dir, verbose)
    if code == ExitCode.OK:
        _say(f"generated pairs: {synth_dir / 'outputs' / 'pairs'}")
        _say(f"nnU-Net v2 dataset: {synth_dir / 'outputs' / 'nnUNet_raw' / 'Dataset900_MedGenDemo'}")
    return code


#: the demo's translation model and sampling: about two minutes on 2 CPU cores in all (toy quality)
TRANSLATION_DEMO = {"grid": [24, 24, 16], "training_steps": 60, "batch_size": 4, "sampling_steps": 10}


def _translation_step(out_dir: Path, device: str, verbose: bool = False, grid=None, training_steps=None, sampling_steps=None) -> int:
    """Train a tiny T1 model, translate the simulated PD volume, print the LMI agreement with the source
    and with an unrelated source (the PD volume flipped front-back and top-bottom: same intensities,
    other structure). Defaults from :data:`TRANSLATION_DEMO`; the arguments shrink it for tests."""
    import torch
    from monai.data import MetaTensor

    from medgen.cli.main import _run_job_dir
    from medgen.data.samples import load_sample_case
    from medgen.io import load_volume, save_volume
    from medgen.slicer.runner import write_job
    from medgen.translate.model import lmi_agreement, load_translation_model

    grid = grid or TRANSLATION_DEMO["grid"]
    training_steps = training_steps or TRANSLATION_DEMO["training_steps"]
    sampling_steps = sampling_steps or TRANSLATION_DEMO["sampling_steps"]
    _say("step 4: zero-shot modality translation (LMI-conditioned DDPM, MIDiffusion style)")
    _say(f"  training a TINY 2.5D CPU model ({training_steps} steps on a {'x'.join(map(str, grid))} grid) on the real T1 only;")
    _say("  it never sees PD. Toy quality: the point is the pipeline, not the images")
    folder = out_dir / "translation"
    case = load_sample_case("small")
    t1 = save_volume(case.t1, folder / "t1.nii.gz")
    pd = save_volume(case.pd_simulated, folder / "pd_simulated.nii.gz")
    train_dir = write_job(out_dir / "jobs", "translate-train", {"volumes": [str(t1)]},
                          {"grid": list(grid), "steps": training_steps, "batch_size": TRANSLATION_DEMO["batch_size"],
                           "target_modality": "T1"}, device=device)
    code = _run_job_dir(train_dir, verbose)
    if code != ExitCode.OK:
        return code
    model = train_dir / "outputs" / "model"
    translate_dir = write_job(out_dir / "jobs", "translate", {"source": str(pd), "model": str(model)},
                              {"sampler": "ddim", "steps": sampling_steps}, device=device)
    code = _run_job_dir(translate_dir, verbose)
    if code != ExitCode.OK:
        return code
    translated = load_volume(translate_dir / "outputs" / "translated.nii.gz")
    config, _ = load_translation_model(model, torch.device("cpu"))
    unrelated = MetaTensor(torch.flip(case.pd_simulated.as_tensor(), dims=[2, 3]), affine=case.pd_simulated.affine)
    with_source, with_unrelated = (lmi_agreement(config, source, translated) for source in (case.pd_simulated, unrelated))
    _say(f"SIMULATED PD -> T1 with a tiny CPU model: {translate_dir / 'outputs' / 'translated.nii.gz'}")
    _say("  (a model this small and this briefly trained may not beat the unrelated source yet: a useful model needs")
    _say("  the 'midiffusion' preset and thousands of steps on a GPU)")
    _say(f"LMI agreement of the translation with its PD source {with_source:.4f} vs with an unrelated source {with_unrelated:.4f}")
    return code


#: the demo's mask-conditioned model: a couple of minutes on 2 CPU cores in all (toy quality)
MASK_SYNTHESIS_DEMO = {"grid": [24, 24, 24], "stage_steps": 60, "checker_steps": 60, "candidates": 4, "sampling_steps": 10}


def _mask_synthesis_step(out_dir: Path, device: str, verbose: bool = False, grid=None, stage_steps=None, checker_steps=None, candidates=None) -> int:
    """Train a tiny mask-conditioned model (T1 + tissue labels as the source, unlabelled SIMULATED T2 as the
    target), render SIMULATED-T2 images of two held-out label maps and print the checker's verdicts.
    Defaults from :data:`MASK_SYNTHESIS_DEMO`; the arguments shrink it for tests."""
    import json

    from medgen.cli.main import _run_job_dir
    from medgen.data.samples import load_sample_case
    from medgen.io import save_volume
    from medgen.labels import save_labels
    from medgen.slicer.runner import write_job

    settings = dict(MASK_SYNTHESIS_DEMO, **{key: value for key, value in
                    (("grid", grid), ("stage_steps", stage_steps), ("checker_steps", checker_steps), ("candidates", candidates))
                    if value is not None})
    _say("step 5: mask-conditioned synthesis into an unannotated modality (ControlNet + checker filter, MRGen style)")
    _say(f"  training a TINY CPU model ({settings['stage_steps']} steps per stage on a {'x'.join(map(str, settings['grid']))} grid):")
    _say("  tissue labels exist only for the T1 volumes; the SIMULATED T2 volumes come without labels. Toy quality")
    folder = out_dir / "mask_synthesis"
    sources, labels, targets, masks = [], [], [], []
    for seed in range(1, 7):  # independent noise/bias draws of the one sample subject
        case = load_sample_case("tiny", seed=seed)
        if seed <= 2:
            sources.append(str(save_volume(case.t1, folder / f"source_{seed}_t1.nii.gz")))
            labels.append(str(save_volume(case.tissue_labels, folder / f"source_{seed}_labels.nii.gz", label=True)))
        elif seed <= 4:
            targets.append(str(save_volume(case.t2_simulated, folder / f"target_{seed}_t2_simulated.nii.gz")))
        else:
            masks.append(str(save_volume(_mirrored(case.tissue_labels), folder / f"mask_{seed}.nii.gz", label=True)))
    names = save_labels(load_sample_case("tiny").labels, folder / "labels.json")
    stage_steps = settings["stage_steps"]
    train_dir = write_job(out_dir / "jobs", "maskgen-train",
                          {"source_images": sources, "source_labels": labels, "target_images": targets, "label_names": str(names)},
                          {"shape": list(settings["grid"]), "preset": "tiny", "source_modality": "T1 brain MRI",
                           "target_modality": "T2 brain MRI (simulated)", "vae_steps": stage_steps, "unet_steps": stage_steps,
                           "controlnet_steps": stage_steps, "checker_steps": settings["checker_steps"]}, device=device)
    code = _run_job_dir(train_dir, verbose)
    if code != ExitCode.OK:
        return code
    candidates = settings["candidates"]
    generate_dir = write_job(out_dir / "jobs", "maskgen", {"model": str(train_dir / "outputs" / "model"), "masks": masks},
                             {"target_modality": "T2 brain MRI (simulated)", "candidates": candidates, "chunk": candidates,
                              "steps": settings["sampling_steps"]}, device=device)
    code = _run_job_dir(generate_dir, verbose)
    if code != ExitCode.OK:
        return code
    report = json.loads((generate_dir / "outputs" / "report.json").read_text())
    for mask in report["masks"]:
        best_iou = max((candidate["avg_iou"] for candidate in mask["candidates"]), default=0.0)
        _say(f"  mask {mask['mask_id']}: {len(mask['pairs'])} of {candidates} candidates accepted ({mask['status']}; "
             f"best checker IoU {best_iou:.3f})")
    _say(f"accepted pairs: {generate_dir / 'outputs' / 'pairs'}; every candidate's scores: {generate_dir / 'outputs' / 'report.json'}")
    _say("  (a model this small and this briefly trained rarely passes MRGen's thresholds: a useful model needs the")
    _say("  'mrgen' preset and long training on a GPU)")
    return code


def _mirrored(volume):
    """A label map mirrored left-right (a held-out mask the model never saw)."""
    import torch
    from monai.data import MetaTensor

    return MetaTensor(torch.flip(volume.as_tensor(), dims=[1]), affine=volume.affine)


if __name__ == "__main__":
    sys.exit(run_demo(Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")))
