"""The live loss chart on a real MRML scene: nodes linked, points in order, reused run after run, removable."""

from __future__ import annotations

import math

import pytest

from medgen.slicer.plots import CHART_CLASS, SERIES_CLASS, TABLE_CLASS, LossPlot

slicer = pytest.importorskip("slicer")


def _count(scene, class_name):
    return scene.GetNumberOfNodesByClass(class_name)


def _modified_counter(node):
    counts = [0]
    node.AddObserver("ModifiedEvent", lambda caller, event: counts.__setitem__(0, counts[0] + 1))
    return counts


def test_the_chart_plots_the_table_with_titled_axes(mrml_scene):
    plot = LossPlot(mrml_scene, name="TenVOO loss", log_scale=True)
    chart, table_node = plot.chart_node, plot.table_node
    assert [_count(mrml_scene, name) for name in (TABLE_CLASS, SERIES_CLASS, CHART_CLASS)] == [1, 1, 1]
    assert (chart.GetName(), chart.GetTitle(), chart.GetXAxisTitle(), chart.GetYAxisTitle()) == (
        "TenVOO loss", "TenVOO loss", "step", "loss")
    assert chart.GetYAxisLogScale() and not chart.GetXAxisLogScale()
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNode() is table_node
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("step", "loss")
    assert [table_node.GetColumnName(n) for n in range(table_node.GetNumberOfColumns())] == ["step", "loss"]


def test_progress_events_append_points_in_order(mrml_scene):
    plot = LossPlot(mrml_scene, log_scale=True)
    events = [{"event": "progress", "phase": "training", "step": step, "total": 4, "loss": loss}
              for step, loss in ((1, 0.9), (2, 0.5), (3, math.nan), (4, 0.25))]
    events.insert(2, {"event": "log", "message": "step 2: validation Dice 0.5"})
    events.insert(3, {"event": "progress", "phase": "loading", "step": 0, "total": 1})  # no loss: no point
    for event in events:
        plot.record(event)
    plot.append(5, 0.0)  # not drawable on a log axis
    assert plot.points() == ([1.0, 2.0, 4.0], [0.9, 0.5, 0.25])
    assert plot.table_node.GetNumberOfRows() == 3


def test_redraws_are_throttled_and_flush_draws_the_rest(mrml_scene):
    plot = LossPlot(mrml_scene, refresh_interval_s=3600)
    redraws = _modified_counter(plot.table_node)
    for step in range(1, 101):
        plot.append(step, 1.0 / step)
    assert redraws[0] == 1  # the first point redraws at once, the next 99 wait
    plot.flush()
    assert redraws[0] == 2 and plot.points()[0][-1] == 100.0
    plot.flush()  # nothing new: no redraw
    assert redraws[0] == 2


def test_a_new_run_reuses_the_nodes_even_from_a_new_plot_object(mrml_scene):
    first = LossPlot(mrml_scene, name="loss")
    first.append(1, 0.5)
    ids = (first.table_node.GetID(), first.chart_node.GetID())
    first.reset()
    assert first.points() == ([], [])
    first.append(1, 0.4)
    second = LossPlot(mrml_scene, name="loss")  # e.g. the module reloaded: found again by name
    second.reset()
    second.append(1, 0.3)
    assert (second.table_node.GetID(), second.chart_node.GetID()) == ids
    assert second.points() == ([1.0], [0.3])
    assert [_count(mrml_scene, name) for name in (TABLE_CLASS, SERIES_CLASS, CHART_CLASS)] == [1, 1, 1]
    assert second.chart_node.GetNumberOfPlotSeriesNodes() == 1


def test_remove_takes_the_nodes_out_and_a_later_use_recreates_them(mrml_scene):
    plot = LossPlot(mrml_scene)
    plot.append(1, 0.5)
    plot.remove()
    assert [_count(mrml_scene, name) for name in (TABLE_CLASS, SERIES_CLASS, CHART_CLASS)] == [0, 0, 0]
    plot.append(2, 0.25)
    assert plot.points() == ([2.0], [0.25])
    assert plot.chart_node.GetNthPlotSeriesNode(0).GetTableNode() is plot.table_node


def test_a_series_deleted_by_the_user_is_recreated_and_relinked(mrml_scene):
    plot = LossPlot(mrml_scene)
    plot.append(1, 0.5)
    mrml_scene.RemoveNode(plot.chart_node.GetNthPlotSeriesNode(0))
    plot.append(2, 0.25)
    chart = plot.chart_node
    assert _count(mrml_scene, SERIES_CLASS) == 1
    assert chart.GetNumberOfPlotSeriesNodes() == 1 and chart.GetNthPlotSeriesNode(0).GetTableNode() is plot.table_node
    assert plot.points() == ([1.0, 2.0], [0.5, 0.25])


def test_a_run_whose_chart_left_the_scene_is_not_plotted_back_until_the_next_run(mrml_scene):
    """Closing the scene mid-run (to open another patient) must not bring the old run's chart into the new scene."""
    plot = LossPlot(mrml_scene)
    plot.reset()
    plot.append(1, 0.5)
    mrml_scene.Clear(0)
    plot.append(2, 0.25)
    plot.flush()
    assert [_count(mrml_scene, name) for name in (TABLE_CLASS, SERIES_CLASS, CHART_CLASS)] == [0, 0, 0]
    plot.reset()  # the next run
    plot.append(3, 0.125)
    assert plot.points() == ([3.0], [0.125])
