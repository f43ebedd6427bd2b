"""Scene helpers: which scene to use, subject-hierarchy placement, module logics outside the app, and the
check every module runs on a selected volume before a job starts."""

from __future__ import annotations

from medgen.errors import BadInputError

LABELMAP_CLASS = "vtkMRMLLabelMapVolumeNode"
SCALAR_VOLUME_CLASS = "vtkMRMLScalarVolumeNode"


def resolve_scene(scene=None):
    """``scene`` if given, else Slicer's global ``slicer.mrmlScene``."""
    if scene is not None:
        return scene
    import slicer

    if getattr(slicer, "mrmlScene", None) is None:
        raise RuntimeError("No MRML scene: pass scene=... when running outside the Slicer application.")
    return slicer.mrmlScene


def segmentations_logic(scene):
    """The Segmentations module logic (the app's own inside Slicer, a fresh one bound to ``scene`` outside)."""
    import slicer

    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        return modules.segmentations.logic()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    return logic


def subject_hierarchy(scene):
    """The scene's subject hierarchy node."""
    import slicer

    return slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)


def create_folder(scene, name: str) -> int:
    """Add a subject-hierarchy folder called ``name`` at the top of the scene; returns its item ID."""
    hierarchy = subject_hierarchy(scene)
    return hierarchy.CreateFolderItem(hierarchy.GetSceneItemID(), name)


def place_in_folder(node, parent_item: int) -> None:
    """Make ``node``'s subject-hierarchy item a child of ``parent_item`` (a folder, study or the scene)."""
    hierarchy = subject_hierarchy(node.GetScene())
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent_item)
    else:  # outside the app no plugin logic adds items for new nodes
        hierarchy.CreateItem(parent_item, node)


def place_next_to(node, reference_node) -> None:
    """Put ``node`` in ``reference_node``'s subject-hierarchy folder/study and under its parent transform.

    A reference no longer in ``node``'s scene (removed, or the scene was closed while a job ran) places
    nothing: its transform ID could now name another node.
    """
    if reference_node is None or reference_node.GetScene() is not node.GetScene():
        return
    hierarchy = subject_hierarchy(node.GetScene())
    if hierarchy is not None:
        reference_item = hierarchy.GetItemByDataNode(reference_node)
        place_in_folder(node, hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID())
    follow_transform_of(node, reference_node)


def follow_transform_of(node, reference_node) -> None:
    """Put ``node`` under ``reference_node``'s parent transform (none if it has none), so a result written on
    the reference's local grid stays aligned with it; a reference gone from ``node``'s scene changes nothing."""
    if reference_node is not None and reference_node.GetScene() is node.GetScene():
        node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())


def remove_nodes(scene, *nodes) -> None:
    """Remove nodes (with their display/storage nodes and subject-hierarchy items) from ``scene``.

    The item goes first: outside the app no plugin removes it with its node, so a folder removed
    later would otherwise keep dangling children.
    """
    hierarchy = subject_hierarchy(scene)
    for node in nodes:
        if node is None or node.GetScene() is not scene:
            continue
        item = hierarchy.GetItemByDataNode(node) if hierarchy is not None else 0
        if item:
            hierarchy.RemoveItem(item, False, False)
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers.append(node.GetStorageNode())
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and helper.GetScene() is scene:
                scene.RemoveNode(helper)


def check_volume_voxels(volume_node, what: str) -> None:
    """Refuse, before any job starts, a volume no MedGen network can use: none, a label map, no voxels, a single
    slice, several components per voxel, NaN/infinite voxels, or no contrast at all.

    Args:
        what: how the message names the volume's role (``"The source volume"``, ``"Training volume 2"``).
    """
    import numpy as np
    import slicer.util

    if volume_node is None:
        raise BadInputError(f"{what} is not selected; select a volume.")
    name = volume_node.GetName()
    if volume_node.IsA(LABELMAP_CLASS):
        raise BadInputError(f"{what} '{name}' is a label map; select an image volume.")
    image = volume_node.GetImageData()
    if image is None:
        raise BadInputError(f"{what} '{name}' has no image data; load it first.")
    if min(image.GetDimensions()) < 2:
        raise BadInputError(f"{what} '{name}' is {'x'.join(str(n) for n in image.GetDimensions())} voxels: a 3D volume "
                            "with at least 2 voxels along every axis is needed.")
    if image.GetNumberOfScalarComponents() != 1:
        raise BadInputError(f"{what} '{name}' has {image.GetNumberOfScalarComponents()} components per voxel; "
                            "a scalar (grey-level) volume is needed: extract one component first.")
    voxels = slicer.util.arrayFromVolume(volume_node)
    non_finite = int(voxels.size - np.count_nonzero(np.isfinite(voxels)))
    if non_finite:
        raise BadInputError(f"{what} '{name}' has {non_finite} NaN or infinite voxels; replace them "
                            "(e.g. with the background value) first.")
    if voxels.min() == voxels.max():
        raise BadInputError(f"{what} '{name}' is constant (every voxel is {voxels.flat[0]:g}): "
                            "it has no structure to work with.")


def check_selected_once(rows, what: str) -> None:
    """Refuse a list of selections in which one row repeats another (double weight in training, twice
    the same output in generation; always a slip of the selector).

    Args:
        rows: one tuple of nodes per row, e.g. ``(volume,)`` or ``(volume, segmentation)``; none is None.
        what: how the message names a row (``"Training pair"``, ``"Mask"``).

    Raises:
        BadInputError: naming both rows and their nodes.
    """
    first_row: dict[tuple[str, ...], int] = {}
    for row, nodes in enumerate(rows, start=1):
        key = tuple(node.GetID() for node in nodes)
        if key in first_row:
            names = " with ".join(f"'{node.GetName()}'" for node in nodes)
            raise BadInputError(f"{what} {row} repeats {what.lower()} {first_row[key]} ({names}); remove one of them.")
        first_row[key] = row
