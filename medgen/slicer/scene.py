"""Scene helpers: which scene to use, subject-hierarchy placement, module logics outside the app."""

from __future__ import annotations


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


def place_next_to(node, reference_node) -> None:
    """Put ``node`` in ``reference_node``'s subject-hierarchy folder/study and under its parent transform."""
    import slicer

    scene = node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is not None:
        reference_item = hierarchy.GetItemByDataNode(reference_node)
        parent_item = hierarchy.GetItemParent(reference_item) if reference_item else hierarchy.GetSceneItemID()
        item = hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent_item)
        else:  # outside the app no plugin logic adds items for new nodes
            hierarchy.CreateItem(parent_item, node)
    node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())


def remove_nodes(scene, *nodes) -> None:
    """Remove helper nodes (and their display/storage nodes) from ``scene``."""
    for node in nodes:
        if node is None or node.GetScene() is not scene:
            continue
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers.append(node.GetStorageNode())
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and helper.GetScene() is scene:
                scene.RemoveNode(helper)
