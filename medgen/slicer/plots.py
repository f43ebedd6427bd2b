"""A live training-loss curve in the MRML scene: a table (step, loss), a plot series and a chart.

:class:`LossPlot` keeps one set of three nodes per name and reuses them run after run (found again by
their remembered IDs, else by name), so pressing Train ten times never piles up charts. Its
:meth:`LossPlot.record` takes the worker's progress events directly (pass it as ``on_event``), and
only tells the chart to redraw every ``refresh_interval_s``: a training loop may report hundreds of
steps per second, and each redraw of a Slicer plot view costs milliseconds.

No ``qt`` here (showing the chart in the view layout is the panel's job), so it runs under slicer-core.
"""

from __future__ import annotations

import math
import time
from typing import Any

TABLE_CLASS, SERIES_CLASS, CHART_CLASS = "vtkMRMLTableNode", "vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode"
STEP_COLUMN, LOSS_COLUMN = "step", "loss"


class LossPlot:
    """The loss-vs-step chart of one module's training runs.

    Args:
        scene: the MRML scene the nodes live in (default: ``slicer.mrmlScene``).
        name: chart title and the name its three nodes share (``<name>``, ``<name> table``, ``<name> series``).
        log_scale: plot the loss on a logarithmic axis (losses must then be > 0; others are not plotted).
        refresh_interval_s: least time between two redraw requests while points arrive; :meth:`flush` redraws now.
    """

    def __init__(self, scene=None, name: str = "Training loss", log_scale: bool = False,
                 refresh_interval_s: float = 0.5) -> None:
        if scene is None:
            import slicer

            scene = slicer.mrmlScene
        self.scene = scene
        self.name = name
        self.log_scale = log_scale
        self.refresh_interval_s = refresh_interval_s
        self._node_ids: dict[str, str] = {}
        self._last_refresh_s = -math.inf
        self._pending = False

    @property
    def table_node(self):
        """The ``vtkMRMLTableNode`` with the columns ``step`` and ``loss`` (created on first use)."""
        return self._nodes()[TABLE_CLASS]

    @property
    def chart_node(self):
        """The ``vtkMRMLPlotChartNode`` to show in a plot view (created on first use)."""
        return self._nodes()[CHART_CLASS]

    def reset(self) -> None:
        """Start a new run: empty the table, keep (or re-create) the nodes."""
        table = self.table_node.GetTable()
        for column in range(table.GetNumberOfColumns()):
            table.GetColumn(column).SetNumberOfTuples(0)
        self._pending = True
        self.flush()

    def append(self, step: float, loss: float) -> None:
        """Add one point; the chart redraws at most every ``refresh_interval_s`` (see :meth:`flush`).

        Non-finite losses (and losses <= 0 on a log axis) are skipped: the plot view cannot draw them,
        and the status line still shows the value.
        """
        if not math.isfinite(loss) or (self.log_scale and loss <= 0) or self._gone():
            return
        table = self.table_node.GetTable()
        table.GetColumnByName(STEP_COLUMN).InsertNextValue(float(step))
        table.GetColumnByName(LOSS_COLUMN).InsertNextValue(float(loss))
        self._pending = True
        if time.monotonic() - self._last_refresh_s >= self.refresh_interval_s:
            self.flush()

    def record(self, event: dict[str, Any]) -> None:
        """Take one worker event (pass as an ``on_event`` callback): progress events with a ``loss`` add a point."""
        if event.get("event") == "progress" and event.get("loss") is not None:
            self.append(float(event.get("step", 0)), float(event["loss"]))

    def flush(self) -> None:
        """Redraw now if points arrived since the last redraw (call when the job ends)."""
        if not self._pending or self._gone():
            return
        self.table_node.GetTable().Modified()  # the table node observes its table and tells the series and chart
        self._pending = False
        self._last_refresh_s = time.monotonic()

    def points(self) -> tuple[list[float], list[float]]:
        """The plotted ``(steps, losses)``, in the order they arrived."""
        table = self.table_node.GetTable()
        columns = (table.GetColumnByName(STEP_COLUMN), table.GetColumnByName(LOSS_COLUMN))
        return tuple([column.GetValue(row) for row in range(column.GetNumberOfTuples())] for column in columns)

    def remove(self) -> None:
        """Remove the chart, series and table from the scene (a later use creates them again)."""
        for node in self._existing_nodes().values():
            self.scene.RemoveNode(node)
        self._node_ids.clear()

    def _gone(self) -> bool:
        """True when every node of this run left the scene (the scene was closed, perhaps for another patient's, or
        the user deleted the chart): the run's points are not brought back into it; :meth:`reset` starts anew."""
        return bool(self._node_ids) and not self._existing_nodes()

    def _existing_nodes(self) -> dict[str, Any]:
        """This plot's nodes still in the scene, by class: remembered IDs first, else found by name."""
        names = {TABLE_CLASS: f"{self.name} table", SERIES_CLASS: f"{self.name} series", CHART_CLASS: self.name}
        found = {}
        for class_name, node_name in names.items():
            node = self.scene.GetNodeByID(self._node_ids.get(class_name, ""))
            if node is None or not node.IsA(class_name):
                node = next(iter(_nodes_named(self.scene, class_name, node_name)), None)
            if node is not None:
                found[class_name] = node
        return found

    def _nodes(self) -> dict[str, Any]:
        """The three nodes, created where missing and linked table -> series -> chart."""
        nodes = self._existing_nodes()
        if len(nodes) < 3:
            nodes = self._create_missing(nodes)
        self._node_ids = {class_name: node.GetID() for class_name, node in nodes.items()}
        return nodes

    def _create_missing(self, nodes: dict[str, Any]) -> dict[str, Any]:
        import vtk

        if TABLE_CLASS not in nodes:
            table_node = self.scene.AddNewNodeByClass(TABLE_CLASS, f"{self.name} table")
            for column_name in (STEP_COLUMN, LOSS_COLUMN):
                column = vtk.vtkDoubleArray()
                column.SetName(column_name)
                table_node.AddColumn(column)
            nodes[TABLE_CLASS] = table_node
        if SERIES_CLASS not in nodes:
            series = self.scene.AddNewNodeByClass(SERIES_CLASS, f"{self.name} series")
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleNone)
            series.SetXColumnName(STEP_COLUMN)
            series.SetYColumnName(LOSS_COLUMN)
            nodes[SERIES_CLASS] = series
        nodes[SERIES_CLASS].SetAndObserveTableNodeID(nodes[TABLE_CLASS].GetID())
        if CHART_CLASS not in nodes:
            chart = self.scene.AddNewNodeByClass(CHART_CLASS, self.name)
            chart.SetTitle(self.name)
            chart.SetXAxisTitle(STEP_COLUMN)
            chart.SetYAxisTitle(LOSS_COLUMN)
            chart.SetLegendVisibility(False)
            nodes[CHART_CLASS] = chart
        nodes[CHART_CLASS].SetYAxisLogScale(self.log_scale)
        series_id = nodes[SERIES_CLASS].GetID()
        if not any(nodes[CHART_CLASS].GetNthPlotSeriesNodeID(n) == series_id
                   for n in range(nodes[CHART_CLASS].GetNumberOfPlotSeriesNodes())):
            nodes[CHART_CLASS].AddAndObservePlotSeriesNodeID(series_id)
        return nodes


def _nodes_named(scene, class_name: str, name: str) -> list:
    collection = scene.GetNodesByClassByName(class_name, name)
    return [collection.GetItemAsObject(index) for index in range(collection.GetNumberOfItems())]
