"""The MedGen sample subject in Slicer's Sample Data module (needs the Slicer app).

Each MedGen module connects :func:`register_sample_data` to the application's ``startupCompleted()`` signal. All
three register the same source (same name, thumbnail and loader), which Sample Data lists once, under "MedGen".
Its button calls :func:`load_sample_into_scene`: no download, the subject is built from the template inside the
nilearn wheel (:mod:`medgen.slicer.sample_data`) and kept in Slicer's cache folder.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import slicer

#: the Sample Data category (a collapsible group of buttons)
CATEGORY = "MedGen"
#: the button's picture: an axial slice of the sample T1 beside its tissue labels
THUMBNAIL = Path(__file__).with_name("MedGenBrain.png")
#: what building the subject imports: the library's own dependencies, and nilearn for the template files in its wheel
#: (installed without its dependencies by "Install dependencies"; never imported)
REQUIRED_PACKAGES = ("torch", "monai", "nilearn")


def register_sample_data() -> None:
    """Add the MedGen sample subject to Slicer's Sample Data module (a no-op when it is registered already, or when
    the Sample Data module is disabled in the application settings)."""
    try:
        import SampleData
    except ImportError:
        return

    from medgen.slicer.sample_data import SAMPLE_NAME

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=CATEGORY, sampleName=SAMPLE_NAME, uris=[], fileNames=[], nodeNames=[],
        thumbnailFileName=str(THUMBNAIL), customDownloader=load_sample_into_scene,
    )


def missing_packages() -> list[str]:
    """The packages of :data:`REQUIRED_PACKAGES` that are not installed (found without importing them)."""
    return [package for package in REQUIRED_PACKAGES if importlib.util.find_spec(package) is None]


def load_sample_into_scene(source=None) -> list:
    """Sample Data's button: load the sample subject into the scene and show its T1 with the tissue segmentation.

    Args:
        source: the Sample Data source that was clicked (unused: there is one MedGen sample).

    Returns:
        The new nodes (three volumes, then the segmentation).

    Raises:
        Exception: whatever stopped the loading, after an error dialog says it (outside testing mode); the scene
            is left as it was.
    """
    with slicer.util.tryWithErrorDisplay("Loading the MedGen sample data failed.", waitCursor=True):
        missing = missing_packages()
        if missing:
            raise RuntimeError(f"The MedGen sample data needs {', '.join(missing)}: open a MedGen module, press "
                               "'Install dependencies' in its Setup section, then restart Slicer.")
        from medgen.slicer.sample_data import load_sample_data

        nodes = load_sample_data(slicer.app.cachePath, scene=slicer.mrmlScene)
        slicer.util.setSliceViewerLayers(background=nodes[0], fit=True)
    return nodes
