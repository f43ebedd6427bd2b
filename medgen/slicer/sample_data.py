"""The offline sample subject as scene nodes: what Slicer's Sample Data module loads for MedGen.

:mod:`medgen.data.samples` builds the subject (the MNI152 T1 template shipped in the nilearn wheel, tissue labels
derived from it, simulated T2-/PD-like contrasts) with no download. Here it is written once into a cache folder and
loaded as three scalar volumes and one tissue segmentation that share the T1's grid, ready for every MedGen module
(and Segment Editor). MRML only: the Sample Data registration, which needs the Slicer app, is
:mod:`medgen.slicerqt.sample_data`. It reads :data:`SAMPLE_NAME` at Slicer's startup, possibly before torch is
installed, so torch and MONAI are imported inside the functions.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from medgen.io.atomic import write_text_atomic
from medgen.slicer.scene import remove_nodes, resolve_scene

#: the name the Sample Data module shows, and the prefix of the loaded nodes
SAMPLE_NAME = "MedGenBrain"
#: grid of the cached subject: 2 mm isotropic, the whole template (99×117×95 voxels)
SAMPLE_SIZE = "reduced"
#: bumped whenever the subject's recipe changes, so older caches are rebuilt rather than reused
SAMPLE_VERSION = 1
#: written last into the cache folder: its presence (with matching checksums) marks a complete subject
MANIFEST_NAME = "medgen_sample.json"
#: node name suffix of each cached volume file (file stem -> node name suffix)
VOLUME_NODES = {"t1": "T1", "t2_simulated": "T2_simulated", "pd_simulated": "PD_simulated"}
TISSUE_NODE_SUFFIX = "tissues"


def sample_folder(cache_root: str | os.PathLike) -> Path:
    """The cache folder of the sample subject under ``cache_root`` (Slicer's cache path inside the app)."""
    return Path(cache_root) / "MedGen" / f"{SAMPLE_NAME}-{SAMPLE_SIZE}-v{SAMPLE_VERSION}"


#: the files of the cached subject (what :func:`ensure_sample_files` returns)
SAMPLE_FILES = ("t1", "t2_simulated", "pd_simulated", "tissue_labels", "brain_mask", "labels")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_files(folder: Path) -> dict[str, Path] | None:
    """The cached files named by a complete, intact manifest, else None (absent, partial or corrupted cache)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = {name: folder / entry["file"] for name, entry in manifest["files"].items()}
        intact = manifest["version"] == SAMPLE_VERSION and set(files) == set(SAMPLE_FILES) and all(
            _sha256(files[name]) == entry["sha256"] for name, entry in manifest["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # any damage means: build it again
        return None
    return files if intact else None


def ensure_sample_files(cache_root: str | os.PathLike) -> dict[str, Path]:
    """The sample subject's files in :func:`sample_folder`, written there first unless an intact copy is cached.

    Each file is written atomically and the manifest (file names and SHA-256) last, so an interrupted write or a
    damaged file is found out and rebuilt by the next call rather than loaded.

    Returns:
        name -> path for ``t1``, ``t2_simulated``, ``pd_simulated`` (NIfTI), ``tissue_labels`` (NIfTI label map),
        ``brain_mask`` and ``labels`` (the tissue names and colours, JSON).

    Raises:
        BadInputError: the nilearn package that ships the template is not installed.
    """
    folder = sample_folder(cache_root)
    cached = _cached_files(folder)
    if cached is not None:
        return cached
    from medgen.data.samples import load_sample_case, write_sample_case

    paths = write_sample_case(load_sample_case(SAMPLE_SIZE), folder)
    entries = {name: {"file": path.name, "sha256": _sha256(path)} for name, path in paths.items()}
    write_text_atomic(folder / MANIFEST_NAME, json.dumps({"version": SAMPLE_VERSION, "files": entries}, indent=2) + "\n")
    return paths


def load_sample_data(cache_root: str | os.PathLike, *, scene=None) -> list:
    """Load the sample subject into the scene: all of it, or nothing when any part fails.

    Args:
        cache_root: folder that keeps the written subject between calls (Slicer's cache path in the app).
        scene: target scene (default ``slicer.mrmlScene``).

    Returns:
        The new nodes: scalar volumes ``MedGenBrain_T1``, ``_T2_simulated`` and ``_PD_simulated`` (real T1
        anatomy, simulated contrasts, intensities in [0, 1]) and the segmentation ``MedGenBrain_tissues``
        (CSF, grey matter, white matter) on the T1's grid. Each name is made unique in the scene.
    """
    from medgen.io import load_volume
    from medgen.labels import load_labels
    from medgen.slicer.segmentations import labelmap_to_segmentation
    from medgen.slicer.volumes import file_to_volume_node

    scene = resolve_scene(scene)
    paths = ensure_sample_files(cache_root)
    nodes = []
    try:
        for stem, suffix in VOLUME_NODES.items():  # the node helpers make each name unique in the scene
            nodes.append(file_to_volume_node(paths[stem], f"{SAMPLE_NAME}_{suffix}", scene=scene))
        tissues = load_volume(paths["tissue_labels"], label=True)
        nodes.append(labelmap_to_segmentation(tissues, load_labels(paths["labels"]), f"{SAMPLE_NAME}_{TISSUE_NODE_SUFFIX}",
                                              scene=scene, reference_node=nodes[0]))
    except Exception:
        remove_nodes(scene, *nodes)
        raise
    return nodes

