"""Cross-Modal Translation module on a real MRML scene: scene volumes -> model -> translated volume node.

One tiny 2.5D model is trained per file (in process, on a 16x16x8 grid); translation, cancel and
failure run through the real worker.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from safetensors.torch import save_file

from medgen_testing import cancel_once_running, oblique_affine, scene_snapshot
from medgen.errors import BadInputError, MedGenError, ModelError, OutOfMemoryError
from medgen.io import load_volume, save_volume
from medgen.jobs.exit_codes import ExitCode
from medgen.slicer.scene import create_folder, place_in_folder, subject_hierarchy
from medgen.slicer.scene_job import SceneJob
from medgen.slicer.volumes import ijk_to_ras_of, tensor_to_volume_node
from medgen.translate.model import TranslationConfig, train_translation

slicer = pytest.importorskip("slicer")
REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "CrossModalTranslate"))
sys.path.insert(0, str(REPOSITORY / "Testing" / "packaging"))
from CrossModalTranslateLib import translation  # noqa: E402  (the module folder is what Slicer puts on sys.path)
from slicer_stubs import slicer_gui_stubs  # noqa: E402

SHAPE = (20, 18, 12)


def _phantom(contrast=(0.8, 0.4, 0.05), seed: int = 0) -> MetaTensor:
    """A core in a shell in a background ``(1, 20, 18, 12)``; ``contrast`` gives the three intensities."""
    axes = [torch.linspace(-1, 1, size) for size in SHAPE]
    radius = torch.stack(torch.meshgrid(*axes, indexing="ij")).pow(2).sum(0).sqrt()
    core, shell, background = contrast
    image = torch.where(radius < 0.5, core, torch.where(radius < 0.9, shell, background))
    image = image + 0.02 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    return MetaTensor(image[None].float(), affine=torch.from_numpy(oblique_affine()))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny T1 model (2 training steps: the tests check plumbing, not image quality)."""
    folder = train_translation([_phantom(seed=1), _phantom(seed=2)], tmp_path_factory.mktemp("model") / "t1 model",
                               TranslationConfig.tiny(grid=(16, 16, 8), steps=2, batch_size=4), target_modality="T1")
    return folder


@pytest.fixture
def t2_source(mrml_scene):
    """A T2-like source (inverted contrast) on an oblique grid, under a transform, in a subject-hierarchy folder."""
    node = tensor_to_volume_node(_phantom((0.1, 0.9, 0.3), seed=3), "phantom", scene=mrml_scene)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    place_in_folder(node, create_folder(mrml_scene, "patient 1"))
    return node


def test_model_folder_is_described_from_its_spec(model):
    info = translation.model_info(model)
    assert (info.target_modality, info.mode, info.grid, info.conditioned, info.training_volumes) == ("T1", "2.5d", (16, 16, 8), True, 2)
    assert info.describe() == "T1 model: 2.5d, 16x16x8 grid, trained on 2 volume(s)"


def test_invalid_model_folders_are_refused_naming_what_is_missing(model, tmp_path):
    with pytest.raises(BadInputError, match="Choose the translation model folder"):
        translation.model_info(None)
    with pytest.raises(BadInputError, match="does not exist"):
        translation.model_info(tmp_path / "nowhere")
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(BadInputError, match="weights.safetensors is a file, not a folder"):
        translation.model_info(tmp_path / "weights.safetensors")
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(ModelError, match="it has no medgen_model.json"):
        translation.model_info(tmp_path)
    (tmp_path / "medgen_model.json").write_text(json.dumps({"task": "joint-image-label-ldm"}))
    with pytest.raises(ModelError, match="holds a model for task 'joint-image-label-ldm'"):
        translation.model_info(tmp_path)
    (tmp_path / "medgen_model.json").write_text(json.dumps({"task": "lmi-translation"}))
    with pytest.raises(ModelError, match="no model settings"):
        translation.model_info(tmp_path)
    shutil.copy(model / "medgen_model.json", tmp_path / "medgen_model.json")
    with pytest.raises(ModelError, match="no weights file unet.safetensors"):
        translation.model_info(tmp_path)
    shutil.copy(model / "unet.safetensors", tmp_path / "unet.safetensors")
    document = json.loads((model / "medgen_model.json").read_text())
    for config, message in (({"mode": "2.5d", "grid": None}, "settings of the wrong type"),
                            ({"mode": "2d", "grid": [32, 32, 16]}, "mode '2d' on grid"),
                            ({"mode": "3d", "grid": [32, 32]}, "on grid \\[32, 32\\], which no translation model has")):
        (tmp_path / "medgen_model.json").write_text(json.dumps({**document, "config": config}))
        with pytest.raises(ModelError, match=message):  # the panel shows it; a raw TypeError broke entering the module
            translation.model_info(tmp_path)


def test_request_writes_the_source_with_its_exact_oblique_geometry(model, t2_source, tmp_path):
    request = translation.translate_request(t2_source, model, sampler="ddim", steps=8, seed=3, source_modality="T2")
    assert (request.kind, request.seed, request.input_files) == ("translate", 3, {"model": str(model)})
    assert request.params == {"sampler": "ddim", "steps": 8, "memory_budget_mb": None}
    # a DDIM step count that does not divide T is refused before any job: the chain must start at t = 999
    with pytest.raises(BadInputError, match="got 7, use e.g. 5 or 8"):
        translation.translate_request(t2_source, model, sampler="ddim", steps=7)
    assert request.imports[0].node_name == "phantom (T2→T1)" and request.reference_node is t2_source
    written = load_volume(request.write_inputs(tmp_path)["source"])
    np.testing.assert_allclose(written.affine.numpy(), ijk_to_ras_of(t2_source), rtol=0, atol=1e-9)
    np.testing.assert_array_equal(written[0].numpy(), slicer.util.arrayFromVolume(t2_source).transpose(2, 1, 0))


def test_translation_comes_back_as_one_volume_next_to_the_source_with_its_geometry(model, t2_source, mrml_scene, tmp_path):
    before = {node.GetID() for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")}
    with slicer_gui_stubs():  # the console path: the module's Logic, blocking
        logic = __import__("CrossModalTranslate").CrossModalTranslateLogic()
        output = logic.translate(t2_source, model, sourceModality="T2", steps=4, seed=1, device="cpu", jobRoot=tmp_path)
    new_volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode") if node.GetID() not in before]
    assert new_volumes == [output] and output.GetName() == "phantom (T2→T1)"
    np.testing.assert_array_equal(ijk_to_ras_of(output), ijk_to_ras_of(t2_source))
    voxels = slicer.util.arrayFromVolume(output)
    assert voxels.shape == SHAPE[::-1] and np.isfinite(voxels).all() and 0 <= voxels.min() < voxels.max() <= 1
    assert output.GetTransformNodeID() == t2_source.GetTransformNodeID() is not None
    hierarchy = subject_hierarchy(mrml_scene)
    parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output))
    assert hierarchy.GetItemName(parent) == "patient 1"


def test_cancelled_translation_leaves_the_scene_unchanged(model, t2_source, mrml_scene, tmp_path):
    before = scene_snapshot(mrml_scene)
    request = translation.translate_request(t2_source, model, sampler="ddpm")  # 1000 steps: still running when cancelled
    job = SceneJob(request, tmp_path, device="cpu").start()
    cancel_once_running(job, started=lambda event: event.get("phase") == "translating")
    assert job.wait(timeout_s=120) == ExitCode.CANCELLED
    assert job.import_results() == {}
    assert scene_snapshot(mrml_scene) == before


def test_failed_translation_leaves_the_scene_unchanged(model, t2_source, mrml_scene, tmp_path):
    broken = shutil.copytree(model, tmp_path / "broken model")
    request = translation.translate_request(t2_source, broken, steps=2)
    save_file({"stray": torch.zeros(1)}, str(broken / "unet.safetensors"))  # replaced after the request was checked
    before = scene_snapshot(mrml_scene)
    with slicer_gui_stubs():
        logic = __import__("CrossModalTranslate").CrossModalTranslateLogic()
        with pytest.raises(MedGenError, match="The translate job failed: Weights from .*unet.safetensors do not fit the network DiffusionModelUNet"):
            logic.runJob(request, jobRoot=tmp_path / "jobs", device="cpu")
    assert scene_snapshot(mrml_scene) == before


@pytest.mark.parametrize("defect, message", [
    ("nan", "has 1 NaN or infinite voxels"),
    ("constant", r"is constant \(every voxel is 0.5\)"),
    ("label map", "is a label map"),
])
def test_unusable_sources_are_refused_before_any_job_starts(model, mrml_scene, tmp_path, defect, message):
    voxels = _phantom()
    if defect == "nan":
        voxels[0, 3, 4, 5] = float("nan")
    if defect == "constant":
        voxels = MetaTensor(torch.full_like(voxels.as_tensor(), 0.5), affine=voxels.affine)
    node = tensor_to_volume_node(voxels.long() if defect == "label map" else voxels, "bad source", scene=mrml_scene,
                                 label=defect == "label map")
    with pytest.raises(BadInputError, match=f"The source volume 'bad source' {message}"):
        translation.translate_request(node, model)
    assert list(tmp_path.iterdir()) == []


def test_model_grid_size_differences_are_resampled_but_a_slice_is_refused(model, mrml_scene, tmp_path):
    other_size = tensor_to_volume_node(MetaTensor(torch.rand(1, 40, 9, 30), affine=torch.eye(4)), "large", scene=mrml_scene)
    assert translation.translate_request(other_size, model).kind == "translate"  # the worker resamples to 16x16x8
    # the worker reads only 3D volumes, so a single slice is refused before the job even for a 2.5d model
    single_slice = tensor_to_volume_node(MetaTensor(torch.rand(1, 24, 24, 1), affine=torch.eye(4)), "slice", scene=mrml_scene)
    with pytest.raises(BadInputError, match="'slice' is 24x24x1 voxels: a 3D volume with at least 2 voxels along every axis"):
        translation.translate_request(single_slice, model)


def test_out_of_memory_names_the_memory_budget_option(monkeypatch, tmp_path):
    from medgen.translate import jobs

    def run_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jobs, "translate_volume", run_out_of_memory)
    source = save_volume(_phantom(), tmp_path / "source.nrrd")
    ctx = types.SimpleNamespace(inputs={"source": str(source), "model": str(tmp_path)}, device=torch.device("cuda", 0),
                                params={"sampler": "ddim", "steps": 5, "memory_budget_mb": 512.0},
                                spec=types.SimpleNamespace(seed=0), reporter=None)
    with pytest.raises(OutOfMemoryError, match=r"Out of cuda:0 memory translating a \(20, 18, 12\) volume. Lower the LMI "
                                               r"memory budget \(memory_budget_mb, now 512 MB"):
        jobs.run_translate(ctx)


def test_training_request_writes_scene_volumes_and_moves_the_model_where_asked(mrml_scene, tmp_path):
    volumes = [tensor_to_volume_node(_phantom(seed=seed), f"T1 case {seed}", scene=mrml_scene) for seed in (1, 2)]
    request = translation.train_request_from_scene(volumes, target_modality=" T1 ", grid=[16, 16, 8], steps=5,
                                                   model_folder=tmp_path / "my model")
    assert request.params == {"target_modality": "T1", "grid": [16, 16, 8], "mode": "2.5d", "preset": "tiny", "steps": 5}
    inputs = request.write_inputs(tmp_path / "inputs")
    assert [Path(path).name for path in inputs["volumes"]] == ["target000.nrrd", "target001.nrrd"]
    np.testing.assert_allclose(load_volume(inputs["volumes"][1]).affine.numpy(), oblique_affine(), atol=1e-9)
    trained = tmp_path / "job" / "outputs" / "model"
    trained.mkdir(parents=True)
    (trained / "medgen_model.json").write_text("{}")
    assert request.import_results({"outputs": {"model": str(trained)}}) == {"model": tmp_path / "my model"}
    assert (tmp_path / "my model" / "medgen_model.json").is_file() and not trained.exists()


def test_training_inputs_are_checked_before_any_job_starts(mrml_scene, tmp_path):
    with pytest.raises(BadInputError, match="No training volumes"):
        translation.train_request_from_scene([], target_modality="T1")
    good = tensor_to_volume_node(_phantom(), "T1 case", scene=mrml_scene)
    with pytest.raises(BadInputError, match="Name the target modality"):
        translation.train_request_from_scene([good], target_modality=" ")
    with pytest.raises(BadInputError, match="Training volume 2 is not selected"):
        translation.train_request_from_scene([good, None], target_modality="T1")
    other = tensor_to_volume_node(_phantom(), "T1 other case", scene=mrml_scene)
    with pytest.raises(BadInputError, match=r"Training volume 3 repeats training volume 1 \('T1 case'\); remove one"):
        translation.train_request_from_scene([good, other, good], target_modality="T1")
    with pytest.raises(BadInputError, match="holds no volume files"):
        translation.train_request_from_folder(tmp_path, target_modality="T1")
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "a.nrrd").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a volume")
    request = translation.train_request_from_folder(tmp_path, target_modality="T1", mode="3d")
    assert request.input_files == {"volumes": [str(tmp_path / "a.nrrd"), str(tmp_path / "b.nii.gz")]}
    (tmp_path / "scan.seg.nrrd").write_bytes(b"")  # Slicer's segmentation next to a scan, and macOS metadata
    (tmp_path / "._a.nrrd").write_bytes(b"")
    assert translation.volume_files(tmp_path) == [str(tmp_path / "a.nrrd"), str(tmp_path / "b.nii.gz")]
    with pytest.raises(BadInputError, match=r"does not fit a 2-level network: I and J must be multiples of 2"):
        translation.train_request_from_folder(tmp_path, target_modality="T1", grid=(33, 32, 32))
    (tmp_path / "occupied" / "old").mkdir(parents=True)
    with pytest.raises(BadInputError, match="occupied already exists and is not empty"):
        translation.train_request_from_folder(tmp_path, target_modality="T1", model_folder=tmp_path / "occupied")
    with pytest.raises(BadInputError, match="notes.txt is a file, not a folder; choose a folder"):
        translation.train_request_from_folder(tmp_path, target_modality="T1", model_folder=tmp_path / "notes.txt")


def test_segment_editor_gets_one_segmentation_on_the_output_grid_next_to_it(t2_source, mrml_scene):
    segmentation = translation.segmentation_for(t2_source)
    assert segmentation.GetName() == "phantom segmentation"
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is t2_source
    assert segmentation.GetTransformNodeID() == t2_source.GetTransformNodeID()
    hierarchy = subject_hierarchy(mrml_scene)
    assert hierarchy.GetItemName(hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation))) == "patient 1"
    assert translation.segmentation_for(t2_source) is segmentation  # pressing the button again reuses it
    with pytest.raises(BadInputError, match="Select a volume in the scene to segment"):
        translation.segmentation_for(None)
    mrml_scene.RemoveNode(t2_source)  # deleted, while the logic stays reachable from the Python console
    with pytest.raises(BadInputError, match="Select a volume in the scene to segment"):
        translation.segmentation_for(t2_source)


def test_a_zero_memory_budget_a_small_grid_and_an_unnamed_source_modality_are_handled(model, t2_source):
    with pytest.raises(BadInputError, match="memory budget must be positive"):
        translation.translate_request(t2_source, model, steps=8, memory_budget_mb=0)
    request = translation.translate_request(t2_source, model, steps=8, memory_budget_mb=64.0)
    assert request.params["memory_budget_mb"] == 64.0 and request.imports[0].node_name == "phantom (→T1)"
    with pytest.raises(BadInputError, match="at least 8 voxels"):
        translation.train_request_from_scene([t2_source], target_modality="T1", grid=[16, 16, 7])
