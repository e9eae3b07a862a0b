"""Imported torch.profiler traces in the overview, the advice and ``insight report``: the TensorBoard plugin's
step breakdown instead of MindInsight's phases, and no device-utilisation advice for a CPU-only trace."""
from __future__ import annotations

import importlib

import pytest

from insight import analysis
from insight.analysis import gpu
from insight.cli import report_lines
from test_dashboard_pages import find, text
from test_import import _imported_base


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return _imported_base(tmp_path_factory.mktemp("imported"))  # alexnet, cpu, gpu and two-ranks


def test_cpu_only_import_gets_no_low_device_utilisation_advice(imported):
    assert not analysis.advice.has_device(imported / "cpu")
    assert "low_utilization" not in {r.id for r in analysis.recommendations(imported / "cpu")}
    assert analysis.advice.has_device(imported / "alexnet")


def test_report_of_an_import_prints_the_gpu_section_after_the_step_trace(imported):
    lines = report_lines(imported / "alexnet")
    at = next(i for i, ln in enumerate(lines) if ln.startswith("Step breakdown (TensorBoard categories)"))
    assert any(ln.startswith("Step trace:") for ln in lines[:at])
    assert lines[at:at + 1 + len(gpu.CATEGORIES)] == gpu.report_lines(imported / "alexnet")[:1 + len(gpu.CATEGORIES)]


def test_overview_of_an_import_stacks_the_plugin_categories(imported):
    from dashboard.app import create_app

    create_app(imported, reload_interval=0)
    lay = importlib.import_module("dashboard.pages.overview").layout(run_id="alexnet")
    bd = gpu.gpu_step_breakdown(imported / "alexnet")
    fig = find(lay, "step-breakdown").figure
    shown = {t.name: list(t.y) for t in fig.data if t.type == "bar"}
    assert set(shown) <= {gpu.LABELS[c] for c in gpu.CATEGORIES} and gpu.LABELS["kernel"] in shown
    assert shown[gpu.LABELS["kernel"]] == pytest.approx(list(bd["kernel_ms"]))
    s = gpu.gpu_summary(imported / "alexnet")
    assert text(find(lay, "stat-gpu-util")) == f"{s.gpu_utilization * 100:.1f} %"
    assert find(lay, "gpu-kernels") is not None and find(lay, "gpu-cpu-ops") is not None
    # the operators page offers CPU ops / kernels / all
    pipe = importlib.import_module("dashboard.pages.pipeline").layout(run_id="two-ranks", rank="1")
    assert "active" in find(pipe, "rank-1").className
    mem = importlib.import_module("dashboard.pages.memory").layout(run_id="two-ranks", rank="1")
    assert find(mem, "rank-selector") is not None or find(mem, "mem-empty") is not None
    ops = importlib.import_module("dashboard.pages.operators").layout(run_id="alexnet")
    assert {o["value"] for o in find(ops, "ops-kinds").options} == {"all", "cpu", "kernel"}


def test_a_multi_rank_run_has_the_cluster_page_and_a_rank_selector(imported):
    from dashboard.app import create_app

    create_app(imported, reload_interval=0)
    ov = importlib.import_module("dashboard.pages.overview")
    lay = ov.layout(run_id="two-ranks")
    assert find(lay, "nav-cluster") is not None and find(lay, "rank-selector") is not None
    assert find(lay, "rank-1").href == "/run/two-ranks/overview?rank=1"
    assert "active" in find(lay, "rank-0").className
    lay1 = ov.layout(run_id="two-ranks", rank="1")
    assert "active" in find(lay1, "rank-1").className
    assert find(lay1, "ov-run").data == {"run": "two-ranks", "rank": 1}
    assert find(ov.layout(run_id="two-ranks", rank="7"), "ov-run").data["rank"] == 0  # not a rank: the first
    single = ov.layout(run_id="alexnet")
    assert find(single, "nav-cluster") is None and find(single, "rank-selector") is None
    ops = importlib.import_module("dashboard.pages.operators")
    assert find(ops.layout(run_id="two-ranks", rank="1"), "ops-run").data == {"run": "two-ranks", "rank": 1}
    assert ops.filter_ops("", "all", {"run": "two-ranks", "rank": 1}) == \
        ops.op_rows(analysis.op_stats(imported / "two-ranks", rank=1))
