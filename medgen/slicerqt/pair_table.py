"""The training-pairs table (volume + segmentation per row) shared by the modules that train on scene pairs.

The widget's ``.ui`` must hold ``trainingPairsTable`` (a two-column QTableWidget); rows hold node selectors.
"""

from __future__ import annotations

import slicer

from medgen.slicer.scene_job import TrainingPair


class PairTableMixin:
    """Add/remove rows of ``self.ui.trainingPairsTable`` and read them back as :class:`TrainingPair`."""

    def onAddPairButton(self) -> None:
        """Add a row to ``ui.trainingPairsTable`` with a volume selector and a segmentation selector."""
        table = self.ui.trainingPairsTable
        row = table.rowCount
        table.insertRow(row)
        for column, nodeType in enumerate(("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode")):
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = [nodeType]
            selector.showChildNodeTypes = False  # no label map volumes in the image column
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.noneEnabled = True
            selector.setMRMLScene(slicer.mrmlScene)
            table.setCellWidget(row, column, selector)

    def onRemovePairButton(self) -> None:
        """Remove the selected row of ``ui.trainingPairsTable`` (the last one when none is selected)."""
        table = self.ui.trainingPairsTable
        if table.rowCount:
            table.removeRow(table.currentRow() if table.currentRow() >= 0 else table.rowCount - 1)

    def trainingPairs(self) -> list[TrainingPair]:
        """The rows of ``ui.trainingPairsTable`` as :class:`TrainingPair` (nodes may be None)."""
        table = self.ui.trainingPairsTable
        return [TrainingPair(table.cellWidget(row, 0).currentNode(), table.cellWidget(row, 1).currentNode()) for row in range(table.rowCount)]
