"""The offline sample subject in the scene (real MRML, real files) and its Sample Data registration by every module."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from medgen.io import load_volume
from medgen.labels import load_labels
from medgen.slicer import sample_data
from medgen.slicer.segmentations import segment_labels, segmentation_to_labelmap
from medgen.slicer.volumes import ijk_to_ras_of, volume_node_to_tensor

slicer = pytest.importorskip("slicer")
pytest.importorskip("nilearn")

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY / "Testing" / "packaging"))
from slicer_stubs import MODULE_NAMES, fake_app, slicer_gui_stubs  # noqa: E402


def _node_count(scene) -> int:
    return scene.GetNumberOfNodes()


def test_sample_subject_loads_as_three_volumes_and_a_tissue_segmentation_on_the_files_grid(mrml_scene, tmp_path):
    t1, t2, pd, tissues = sample_data.load_sample_data(tmp_path, scene=mrml_scene)

    assert [node.GetName() for node in (t1, t2, pd, tissues)] == [
        "MedGenBrain_T1", "MedGenBrain_T2_simulated", "MedGenBrain_PD_simulated", "MedGenBrain_tissues"]
    paths = sample_data.sample_folder(tmp_path)
    for node, stem in ((t1, "t1"), (t2, "t2_simulated"), (pd, "pd_simulated")):
        written = load_volume(paths / f"{stem}.nii.gz")
        np.testing.assert_allclose(ijk_to_ras_of(node), written.affine.numpy(), atol=1e-6)
        np.testing.assert_array_equal(volume_node_to_tensor(node).numpy(), written.numpy())
    assert volume_node_to_tensor(t1).shape == (1, 99, 117, 95)  # the whole template at 2 mm
    labels = load_labels(paths / "labels.json")
    assert [(label.name, label.value) for label in segment_labels(tissues)] == [
        ("CSF", 1), ("grey matter", 2), ("white matter", 3)]
    assert [label.name for label in labels] == ["CSF", "grey matter", "white matter"]
    # the segmentation holds the written label map voxel for voxel, on the T1's grid
    labelmap, _ = segmentation_to_labelmap(tissues, t1)
    np.testing.assert_array_equal(labelmap.numpy(), load_volume(paths / "tissue_labels.nii.gz", label=True).numpy())


def test_a_second_load_reuses_the_cache_and_makes_unique_node_names(mrml_scene, tmp_path):
    first = sample_data.ensure_sample_files(tmp_path)
    written_at = {name: path.stat().st_mtime_ns for name, path in first.items()}
    sample_data.load_sample_data(tmp_path, scene=mrml_scene)
    nodes = sample_data.load_sample_data(tmp_path, scene=mrml_scene)

    assert {name: path.stat().st_mtime_ns for name, path in sample_data.ensure_sample_files(tmp_path).items()} == written_at
    assert nodes[0].GetName() != "MedGenBrain_T1" and nodes[0].GetName().startswith("MedGenBrain_T1")


@pytest.mark.parametrize("damage", ["truncated file", "no manifest", "older version", "files not a mapping",
                                    "a file left out"])
def test_a_damaged_or_unfinished_cache_is_rebuilt_not_loaded(tmp_path, damage):
    paths = sample_data.ensure_sample_files(tmp_path)
    manifest = sample_data.sample_folder(tmp_path) / sample_data.MANIFEST_NAME
    if damage == "truncated file":
        paths["t1"].write_bytes(paths["t1"].read_bytes()[:100])
    elif damage == "no manifest":  # a write interrupted before its last step
        manifest.unlink()
    elif damage in ("files not a mapping", "a file left out"):  # valid JSON of another shape
        document = json.loads(manifest.read_text())
        files = [] if damage == "files not a mapping" else {k: v for k, v in document["files"].items() if k != "t1"}
        manifest.write_text(json.dumps({**document, "files": files}))
    else:
        document = json.loads(manifest.read_text())
        manifest.write_text(json.dumps({**document, "version": sample_data.SAMPLE_VERSION - 1}))

    rebuilt = sample_data.ensure_sample_files(tmp_path)

    assert load_volume(rebuilt["t1"]).shape == (1, 99, 117, 95)
    assert json.loads(manifest.read_text())["version"] == sample_data.SAMPLE_VERSION
    assert sample_data.ensure_sample_files(tmp_path) == rebuilt


def test_a_failed_load_leaves_the_scene_as_it_was(mrml_scene, tmp_path, monkeypatch):
    import medgen.slicer.segmentations as segmentations

    before = _node_count(mrml_scene)

    def refuse(*args, **kwargs):
        raise RuntimeError("segmentation import failed")

    monkeypatch.setattr(segmentations, "labelmap_to_segmentation", refuse)
    with pytest.raises(RuntimeError, match="segmentation import failed"):
        sample_data.load_sample_data(tmp_path, scene=mrml_scene)
    assert _node_count(mrml_scene) == before


class FakeSampleData(types.ModuleType):
    """Slicer's SampleData module (app only), reduced to the registrations it receives."""

    def __init__(self):
        super().__init__("SampleData")
        registrations = self.registrations = []
        self.SampleDataLogic = types.SimpleNamespace(
            registerCustomSampleDataSource=lambda **source: registrations.append(source))


def test_every_module_registers_the_same_sample_at_startup(monkeypatch):
    fake = FakeSampleData()
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    with slicer_gui_stubs():
        for module_name in MODULE_NAMES:
            getattr(__import__(module_name), module_name)(type("ModuleParent", (), {})())
        slots = slicer.app.connections["startupCompleted()"]
        assert len(slots) == len(MODULE_NAMES)
        for slot in slots:
            slot()
        from medgen.slicerqt.sample_data import load_sample_into_scene

    first = fake.registrations[0]
    # Sample Data lists equal sources once: one MedGen button, whatever the number of modules
    assert fake.registrations == [first] * len(MODULE_NAMES)
    assert first["category"] == "MedGen" and first["sampleName"] == sample_data.SAMPLE_NAME
    assert Path(first["thumbnailFileName"]).is_file()
    assert first["customDownloader"].__name__ == load_sample_into_scene.__name__
    assert first["uris"] == first["fileNames"] == first["nodeNames"] == []


def test_the_sample_data_button_loads_the_subject_and_shows_its_t1(mrml_scene, tmp_path, monkeypatch):
    shown = []
    monkeypatch.setattr(slicer, "app", fake_app(str(tmp_path)), raising=False)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", lambda **layers: shown.append(layers))  # needs the app's views
    with slicer_gui_stubs():
        from medgen.slicerqt.sample_data import load_sample_into_scene

        nodes = load_sample_into_scene(source=None)

    assert [node.GetName() for node in nodes][::3] == ["MedGenBrain_T1", "MedGenBrain_tissues"]
    assert all(node.GetScene() is mrml_scene for node in nodes)
    assert shown == [{"background": nodes[0], "fit": True}]
    assert (sample_data.sample_folder(tmp_path) / sample_data.MANIFEST_NAME).is_file()  # kept in Slicer's cache


def test_the_sample_data_button_without_nilearn_says_how_to_install_it_and_loads_nothing(mrml_scene, tmp_path, monkeypatch):
    import importlib.util

    errors = []
    find_spec = importlib.util.find_spec
    app = fake_app(str(tmp_path))
    app.testingEnabled = lambda: False  # as for a user: the error is shown in a dialog
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nilearn" else find_spec(name, *a))
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append((text, kwargs)))
    before = _node_count(mrml_scene)
    with slicer_gui_stubs():
        from medgen.slicerqt.sample_data import load_sample_into_scene

        with pytest.raises(RuntimeError, match="needs nilearn"):
            load_sample_into_scene()

    assert _node_count(mrml_scene) == before
    (message, _), = errors
    assert message.startswith("Loading the MedGen sample data failed.\n\nThe MedGen sample data needs nilearn: ")
    assert "'Install dependencies'" in message
    assert not sample_data.sample_folder(tmp_path).exists()


def test_registration_without_the_sample_data_module_does_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "SampleData", None)  # a disabled module: importing it raises ImportError
    with slicer_gui_stubs():
        from medgen.slicerqt.sample_data import register_sample_data

        assert register_sample_data() is None
