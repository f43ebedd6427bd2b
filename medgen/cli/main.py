"""``medgen`` command line entry point.

Commands that do heavy work write a job folder and run it through the worker (exactly the path the
Slicer modules use), showing progress bars; ``Ctrl+C`` cancels the job cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from medgen.errors import BadInputError, MedGenError, cannot_write_message
from medgen.jobs.exit_codes import EXIT_CODE_OF_KIND, ExitCode


def _run_job_dir(job_dir: Path, verbose: bool = False) -> int:
    from medgen.cli.progress_view import TerminalEventView
    from medgen.slicer.runner import JobRunner

    view = TerminalEventView(verbose=verbose)
    runner = JobRunner(job_dir, on_event=view).start()
    # The first Ctrl+C cancels; every later one only says so: leaving early would orphan the worker (it runs in its own
    # session and only this wait enforces the kill deadline), and once it has stopped, which takes well under a second,
    # a second Ctrl+C would otherwise end the command mid-summary with a traceback. One handler decides both, so a
    # second Ctrl+C right after the first cannot slip in before the cancel is under way.
    interrupted = []

    def on_interrupt(signum, frame) -> None:
        if interrupted:
            print("[medgen] still stopping the worker...", file=sys.stderr)
            return
        interrupted.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    # the worker runs in its own session: a SIGTERM or SIGHUP meant for this command (timeout, a batch scheduler, a
    # closed terminal) would never reach it, so they cancel it as Ctrl+C does
    stops = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    previous_handlers = {number: signal.signal(number, on_interrupt) for number in stops} if in_main_thread else {}
    try:
        try:
            code = runner.wait()
        except KeyboardInterrupt:
            print("\n[medgen] cancelling (the worker is stopped within a few seconds)...", file=sys.stderr)
            runner.cancel()
            code = runner.wait()
        view.close()
        _print_outcome(runner)
    finally:
        for number, handler in previous_handlers.items():
            signal.signal(number, handler)
    return code


def _print_outcome(runner) -> None:
    """The job's output paths as JSON on stdout; its other result fields and any error on stderr."""
    if runner.result:
        # stdout holds only the output paths (machine-readable); what else the job reports (e.g. how many
        # pairs were accepted per mask) goes to stderr, so a run that wrote nothing says so
        for key, value in runner.result.items():
            if key not in ("event", "time", "outputs"):  # the event's own timestamp is no news to a user
                print(f"[medgen] {key}: {json.dumps(value)}", file=sys.stderr)
        print(json.dumps(runner.result.get("outputs", {}), indent=2))
    if runner.error:
        print(f"[medgen] {runner.error['kind']}: {runner.error['message']}", file=sys.stderr)


def cmd_run(args) -> int:
    from medgen.jobs.spec import JOB_FILE

    job_dir = args.job_dir.resolve()
    if job_dir.name == JOB_FILE and job_dir.is_file():  # the job's own job.json names its folder
        job_dir = job_dir.parent
    if job_dir.exists() and not job_dir.is_dir():
        raise BadInputError(f"{job_dir} is a file; medgen run takes a job folder (the one holding {JOB_FILE}).")
    return _run_job_dir(job_dir, args.verbose)


def cmd_submit(args) -> int:
    """Write a job folder for ``kind`` from JSON inputs/params and run it."""
    return _submit(args.kind, _json_object(args.inputs, "--inputs"), _json_object(args.params, "--params"), args)


def _json_object(text: str, option: str) -> dict:
    """The JSON object given to ``option``; :class:`BadInputError` for anything else."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise BadInputError(f"{option} is not valid JSON ({error}): give an object such as '{{\"steps\": 5}}'.") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{option} must be a JSON object such as '{{\"steps\": 5}}'; got {type(value).__name__} {text!r}.")
    return value


def _submit(kind: str, inputs: dict, params: dict, args) -> int:
    from medgen.slicer.runner import write_job

    job_dir = write_job(args.job_root, kind, inputs, {k: v for k, v in params.items() if v is not None}, args.device, args.seed)
    print(f"[medgen] job folder: {job_dir}", file=sys.stderr)
    return _run_job_dir(job_dir, args.verbose)


def cmd_synth_train(args) -> int:
    inputs = {"folder": str(args.data)}
    if args.label_names:
        inputs["label_names"] = str(args.label_names)
    params = {"shape": args.shape, "spacing_mm": args.spacing_mm, "preset": args.preset,
              "vae_phase1_steps": args.vae_steps, "ldm_steps": args.ldm_steps}
    return _submit("synth-train", inputs, params, args)


def cmd_synthesize(args) -> int:
    params = {"count": args.count, "batch_size": args.batch_size, "steps": args.steps,
              "nnunet_dataset_id": args.nnunet_id, "nnunet_name": args.nnunet_name}
    return _submit("synthesize", {"model": str(args.model)}, params, args)


def cmd_maskgen_train(args) -> int:
    inputs = {"source_images": [str(p) for p in args.source_images], "source_labels": [str(p) for p in args.source_labels],
              "target_images": [str(p) for p in args.target_images]}
    if args.label_names:
        inputs["label_names"] = str(args.label_names)
    params = {"shape": args.shape, "spacing_mm": args.spacing_mm, "preset": args.preset, "source_modality": args.source_modality,
              "target_modality": args.target_modality, "region": args.region, "encoding": args.encoding,
              "vae_steps": args.vae_steps, "unet_steps": args.unet_steps, "controlnet_steps": args.controlnet_steps,
              "target_pseudo_labels": args.target_pseudo_labels, "controlnet_flip_axes": args.flip_axes,
              "unet_flip_axes": args.flip_axes}
    return _submit("maskgen-train", inputs, params, args)


def cmd_maskgen(args) -> int:
    inputs = {"model": str(args.model), "masks": [str(p) for p in args.masks]}
    if args.checker:
        inputs["checker"] = str(args.checker)
    params = {"target_modality": args.target_modality, "candidates": args.candidates, "chunk": args.chunk, "steps": args.steps,
              "guidance_scale": args.guidance_scale, "conditioning_scale": args.conditioning_scale,
              "nnunet_dataset_id": args.nnunet_id, "nnunet_name": args.nnunet_name}
    return _submit("maskgen", inputs, params, args)


def cmd_translate_train(args) -> int:
    params = {"grid": args.grid, "mode": args.mode, "preset": args.preset, "steps": args.steps, "conditioned": not args.unconditional,
              "target_modality": args.target_modality, "lmi_compat": args.lmi_compat, "memory_budget_mb": args.memory_budget_mb}
    return _submit("translate-train", {"volumes": [str(path) for path in args.volumes]}, params, args)


def cmd_translate(args) -> int:
    params = {"sampler": args.sampler, "steps": args.steps, "sdedit_start": args.sdedit_start, "eta": args.eta,
              "memory_budget_mb": args.memory_budget_mb}
    return _submit("translate", {"source": str(args.source), "model": str(args.model)}, params, args)


def cmd_export_nnunet(args) -> int:
    from medgen.labels import load_labels
    from medgen.progress import CallbackReporter
    from medgen.synthesis.nnunet_export import export_nnunet
    from medgen.synthesis.prepare import find_nnunet_pairs

    labels = {"background": 0, **{label.name: label.value for label in load_labels(args.labels)}}
    cases = [(image, label) for _, image, label in find_nnunet_pairs(args.pairs)]
    # warnings (e.g. a case already in the dataset, not added again) go to stderr, as the jobs' do
    reporter = CallbackReporter(lambda event: print(f"[medgen] {event['level']}: {event['message']}", file=sys.stderr)
                                if event["event"] == "log" and event["level"] != "info" else None)
    dataset = export_nnunet(cases, args.out, dataset_id=args.dataset_id, name=args.name, labels=labels,
                            channel_name=args.channel_name, case_prefix=args.case_prefix, reporter=reporter)
    print(dataset)
    return 0


#: what --device accepts
DEVICE_HELP = "auto (CUDA when usable), cpu, cuda or cuda:N"


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0, help="seed of the job's random draws")
    parser.add_argument("--job-root", type=Path, default=Path("medgen_jobs"),
                        help="folder that receives the job folder (inputs, log, outputs; printed when the job starts)")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Option help that ends with the option's default, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        nothing_to_show = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if not action.option_strings or nothing_to_show or "default" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _add_command(commands, name: str, summary: str) -> argparse.ArgumentParser:
    """A subcommand whose help starts with ``summary`` and shows every option's default."""
    return commands.add_parser(name, help=summary, description=summary, formatter_class=_HelpWithDefaults)


def cmd_info(args) -> int:
    import medgen
    from medgen.devices import cuda_usable, describe_device, select_device
    from medgen.jobs.kinds import get_kind, known_kinds
    from medgen.jobs.manifest import package_versions

    if args.kind:  # one job kind's inputs and parameters (JSON schemas with defaults), for `medgen submit`
        kind = get_kind(args.kind)
        print(json.dumps({"kind": kind.name, "summary": kind.summary, "inputs": kind.inputs, "params": kind.params}, indent=2))
        return 0
    import torch

    devices = [describe_device(select_device("cpu"))]
    if cuda_usable():
        devices += [describe_device(torch.device(f"cuda:{i}")) for i in range(torch.cuda.device_count())]
    info = {
        "medgen": medgen.__version__,
        "versions": package_versions(),
        "cuda_usable": cuda_usable(),
        "devices": devices,
        "job_kinds": {kind.name: kind.summary for kind in known_kinds()},
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_sample_data(args) -> int:
    from medgen.data.samples import load_sample_case, write_sample_case

    paths = write_sample_case(load_sample_case(args.size, seed=args.seed), args.out)
    print(json.dumps({name: str(path) for name, path in paths.items()}, indent=2))
    return 0


def cmd_demo(args) -> int:
    from medgen.cli.demo import run_demo

    return run_demo(args.out.resolve(), device=args.device, size=args.size, verbose=args.verbose)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgen", description="MedGen: generative AI for 3D medical images (jobs run in a worker process).")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the worker's log lines")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _add_command(commands, "run", "run a job folder (holding job.json) with progress bars")
    run.add_argument("job_dir", type=Path, help="job folder; a finished or interrupted training job continues from its checkpoint")
    run.set_defaults(func=cmd_run)

    submit = _add_command(commands, "submit", "write a job folder for a job kind and run it")
    submit.add_argument("kind", help="job kind (see 'medgen info')")
    submit.add_argument("--inputs", default="{}", help='JSON object, e.g. \'{"image": "t1.nii.gz"}\'')
    submit.add_argument("--params", default="{}", help="JSON object of the kind's parameters")
    _add_job_options(submit)
    submit.set_defaults(func=cmd_submit)

    synth_train = _add_command(commands, "synth-train", "train a joint image+label generator on a folder of pairs")
    synth_train.add_argument("data", type=Path, help="nnU-Net raw folder or folder of {case}_0000.nii.gz + {case}.nii.gz")
    synth_train.add_argument("--label-names", type=Path, help="labels.json naming the label values (default: the folder's nnU-Net dataset.json, if any)")
    synth_train.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32], help="grid of the generated pairs (voxels)")
    synth_train.add_argument("--spacing-mm", type=float, nargs=3, help="resample the pairs to this spacing first")
    synth_train.add_argument("--preset", choices=["tiny", "diff3"], default="tiny", help="tiny: minutes on CPU; diff3: the paper recipe (GPU)")
    synth_train.add_argument("--vae-steps", type=int, help="VAE phase-1 steps (override the preset)")
    synth_train.add_argument("--ldm-steps", type=int, help="latent DDPM steps (override the preset)")
    _add_job_options(synth_train)
    synth_train.set_defaults(func=cmd_synth_train)

    synthesize = _add_command(commands, "synthesize", "generate N image+label pairs from a trained joint model")
    synthesize.add_argument("model", type=Path, help="model folder written by synth-train")
    synthesize.add_argument("--count", type=int, default=4, help="pairs to generate")
    synthesize.add_argument("--batch-size", type=int, default=1, help="pairs denoised at once (more is faster and needs more memory)")
    synthesize.add_argument("--steps", type=int, default=100, help="DDIM steps")
    synthesize.add_argument("--nnunet-id", type=int, help="also export an nnU-Net v2 dataset with this id")
    synthesize.add_argument("--nnunet-name", default="MedGenSynthetic", help="name of that dataset (Dataset<id>_<name>)")
    _add_job_options(synthesize)
    synthesize.set_defaults(func=cmd_synthesize)

    maskgen_train = _add_command(commands, "maskgen-train", "train a mask-conditioned generator (source images+labels, target images)")
    maskgen_train.add_argument("--source-images", type=Path, nargs="+", required=True, help="source-modality images")
    maskgen_train.add_argument("--source-labels", type=Path, nargs="+", required=True, help="their organ label maps (same order)")
    maskgen_train.add_argument("--target-images", type=Path, nargs="+", required=True, help="target-modality images (no labels needed)")
    maskgen_train.add_argument("--source-modality", required=True, help='prompt modality of the source images, e.g. "T1 Abdomen MRI"')
    maskgen_train.add_argument("--target-modality", required=True, help='prompt modality of the target images, e.g. "T2 SPIR Abdomen MRI"')
    maskgen_train.add_argument("--region", default="", help="body region named in the prompts")
    maskgen_train.add_argument("--label-names", type=Path, help="labels.json naming the organ label values")
    maskgen_train.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32], help="training grid (voxels)")
    maskgen_train.add_argument("--spacing-mm", type=float, nargs=3, help="resample the volumes to this spacing first")
    maskgen_train.add_argument("--preset", choices=["tiny", "mrgen"], default="tiny", help="tiny: minutes on CPU; mrgen: the 3D recipe (GPU)")
    maskgen_train.add_argument("--encoding", choices=["one-hot", "merged"], default="one-hot", help="mask encoding of the ControlNet input")
    maskgen_train.add_argument("--vae-steps", type=int, help="VAE steps (override the preset)")
    maskgen_train.add_argument("--unet-steps", type=int, help="latent UNet steps (override the preset)")
    maskgen_train.add_argument("--controlnet-steps", type=int, help="ControlNet steps (override the preset)")
    maskgen_train.add_argument("--target-pseudo-labels", action="store_true",
                               help="extension (not in MRGen): train the ControlNet also on the target images with the checker's masks")
    maskgen_train.add_argument("--flip-axes", type=int, nargs="+", choices=[0, 1, 2], default=[], metavar="AXIS",
                               help="extension (not in MRGen): the latent UNet and ControlNet stages mirror image + mask along "
                                    "these voxel axes (0 1 2 = I J K) at random; only axes along which a mirrored volume is still plausible")
    _add_job_options(maskgen_train)
    maskgen_train.set_defaults(func=cmd_maskgen_train)

    maskgen = _add_command(commands, "maskgen", "render target-modality images of label maps; keep the checker-accepted pairs")
    maskgen.add_argument("model", type=Path, help="model folder written by maskgen-train")
    maskgen.add_argument("masks", type=Path, nargs="+", help="label maps to render, valued like the model's organs (1..K, listed in its medgen_model.json and by the training log)")
    maskgen.add_argument("--target-modality", required=True, help="a modality the model was trained on")
    maskgen.add_argument("--checker", type=Path, help="a maskgen-train checker/ folder, or a MedGen segmentation model "
                         "folder whose classes include the organs (default: the model's own checker)")
    maskgen.add_argument("--candidates", type=int, default=20, help="candidates generated per mask")
    maskgen.add_argument("--chunk", type=int, default=10, help="candidates denoised at once")
    maskgen.add_argument("--steps", type=int, default=50, help="DDIM steps")
    maskgen.add_argument("--guidance-scale", type=float, default=7.0, help="classifier-free guidance scale")
    maskgen.add_argument("--conditioning-scale", type=float, default=1.0,
                         help="ControlNet strength: multiplier of its residuals (1 = as trained; > 1 follows the mask more)")
    maskgen.add_argument("--nnunet-id", type=int, help="also export the accepted pairs as an nnU-Net v2 dataset with this id")
    maskgen.add_argument("--nnunet-name", default="MedGenMaskGen", help="name of that dataset (Dataset<id>_<name>)")
    _add_job_options(maskgen)
    maskgen.set_defaults(func=cmd_maskgen)

    translate_train = _add_command(commands, "translate-train", "train an LMI translation model on target-modality volumes")
    translate_train.add_argument("volumes", type=Path, nargs="+", help="target-modality volumes (e.g. T1)")
    translate_train.add_argument("--grid", type=int, nargs=3, default=[32, 32, 32], metavar=("I", "J", "K"),
                                 help="model grid (voxels, RAS axes); volumes are resampled to it")
    translate_train.add_argument("--mode", choices=["2.5d", "3d"], default="2.5d",
                                 help="2.5d: a 2D network over the axial slices (large volumes); 3d: one 3D network")
    translate_train.add_argument("--preset", choices=["tiny", "midiffusion"], default="tiny",
                                 help="tiny: minutes on CPU; midiffusion: the released network and schedule (GPU)")
    translate_train.add_argument("--steps", type=int, help="training steps (override the preset)")
    translate_train.add_argument("--unconditional", action="store_true", help="train the SDEdit baseline instead")
    translate_train.add_argument("--target-modality", help="modality of the training volumes (e.g. T1), recorded in the model")
    translate_train.add_argument("--lmi-compat", action="store_true",
                                 help="condition on the released LMI definition (to match models of the released code)")
    translate_train.add_argument("--memory-budget-mb", type=float,
                                 help="LMI chunk budget in MB (default: the preset's); lower it on out-of-memory")
    _add_job_options(translate_train)
    translate_train.set_defaults(func=cmd_translate_train)

    translate = _add_command(commands, "translate", "translate a volume zero-shot into the model's modality")
    translate.add_argument("source", type=Path, help="volume to translate (NIfTI, NRRD, ...); the output keeps its grid")
    translate.add_argument("model", type=Path, help="model folder from translate-train")
    translate.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddpm",
                           help="ddpm: all 1000 steps, as released; ddim: --steps steps (faster)")
    translate.add_argument("--steps", type=int, default=100, help="DDIM steps, a divisor of the model's 1000 timesteps")
    translate.add_argument("--sdedit-start", type=int, help="SDEdit baseline: start timestep (unconditional model)")
    translate.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity: 1 = fresh noise every step, 0 = deterministic")
    translate.add_argument("--memory-budget-mb", type=float, help="LMI chunk budget in MB (default: the model's); lower it on GPU out-of-memory")
    _add_job_options(translate)
    translate.set_defaults(func=cmd_translate)

    export = _add_command(commands, "export-nnunet", "write a folder of {case}_0000/{case} pairs as an nnU-Net v2 dataset")
    export.add_argument("pairs", type=Path, help="folder of {case}_0000.nii.gz images and {case}.nii.gz label maps")
    export.add_argument("out", type=Path, help="nnUNet_raw folder")
    export.add_argument("--labels", type=Path, required=True, help="labels.json (values 1..K-1)")
    export.add_argument("--dataset-id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    export.add_argument("--name", required=True, help="dataset name (Dataset<id>_<name>)")
    export.add_argument("--channel-name", default="MRI", help="nnU-Net channel name: CT (any case) selects CT normalisation, which needs images in Hounsfield units; anything else z-scores each case")
    export.add_argument("--case-prefix", default="real",
                        help="prefix of the case identifiers; another prefix adds cases to an existing dataset")
    export.set_defaults(func=cmd_export_nnunet)

    info = _add_command(commands, "info", "versions, devices, GPU memory and job kinds; with a kind, its inputs and parameters")
    info.add_argument("kind", nargs="?", help="a job kind: print its inputs and parameters (JSON schemas with defaults)")
    info.set_defaults(func=cmd_info)

    samples = _add_command(commands, "sample-data", "write the offline sample subject (MNI152 + simulated contrasts)")
    samples.add_argument("out", type=Path, help="folder to write the NIfTI files, labels.json and a README into")
    samples.add_argument("--size", default="reduced", choices=["full", "reduced", "small", "tiny"],
                         help="grid: full 1 mm, reduced 2 mm, small 4 mm (48x56x48), tiny 6 mm (32^3)")
    samples.add_argument("--seed", type=int, default=0, help="seed of the simulated contrasts' noise and bias field")
    samples.set_defaults(func=cmd_sample_data)

    demo = _add_command(commands, "demo", "run the demo pipeline on the sample data")
    demo.add_argument("--out", type=Path, default=Path("demo_output"), help="folder for the demo's sample data, jobs and results")
    demo.add_argument("--device", default="auto", help=DEVICE_HELP)
    demo.add_argument("--size", default="tiny", choices=["reduced", "small", "tiny"], help="grid of the sample subject (tiny = 32³, fastest)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
            # every process would submit its own copy of the job: N single-process runs, not one run on N GPUs
            raise BadInputError(
                "The medgen command runs each job in one worker process, so it is not launched with torchrun. For "
                "several GPUs, call the library's training under torchrun (docs/diffusion.md, 'Several GPUs')."
            )
        return int(args.func(args))
    except MedGenError as error:
        print(f"medgen: {error}", file=sys.stderr)
        return int(EXIT_CODE_OF_KIND.get(error.kind, ExitCode.INTERNAL))
    except OSError as error:  # a folder it cannot create or write (sample-data OUT, --job-root, export-nnunet OUT)
        if (message := cannot_write_message(error)) is None:
            raise
        print(f"medgen: {message}", file=sys.stderr)
        return int(ExitCode.BAD_INPUT)


if __name__ == "__main__":
    sys.exit(main())
