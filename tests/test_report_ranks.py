"""``insight report`` on multi-rank runs that are not whole: one rank failed while recording (the run is
marked failed), or a rank's directory is missing (rank_0 included). The healthy ranks are still reported,
and the report says which rank failed or is missing."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synthetic_runs import training_run

ROOT = Path(__file__).resolve().parents[1]


def _two_ranks(base: Path, name: str) -> Path:
    run = training_run(base, name).path
    shutil.copytree(run / "rank_0", run / "rank_1")
    m = json.loads((run / "manifest.json").read_text())
    m.update(ranks=[0, 1], group_size=2, rank_status={"0": {"status": "complete"}, "1": {"status": "complete"}})
    (run / "manifest.json").write_text(json.dumps(m))
    return run


def _report(run: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "insight.cli", "report", str(run), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_a_failed_rank_leaves_the_healthy_ranks_reported(tmp_path):
    run = _two_ranks(tmp_path, "one-rank-failed")
    m = json.loads((run / "manifest.json").read_text())
    m["status"] = "failed"
    m["rank_status"]["1"] = {"status": "failed", "error": "disk full"}
    (run / "manifest.json").write_text(json.dumps(m))
    r = _report(run)
    assert r.returncode == 0, r.stderr
    assert "rank 1 of 2 failed" in r.stdout and "healthy rank(s) 0" in r.stdout
    assert "Step trace: 5 steps" in r.stdout
    # asking for the failed rank is refused with one line naming the readable ones
    r = _report(run, "--rank", "1")
    assert r.returncode == 2 and "readable" not in r.stdout and "has ranks 0" in r.stderr
    assert "Traceback" not in r.stderr


def test_every_rank_failed_is_still_an_error(tmp_path):
    run = training_run(tmp_path, "failed").path
    m = json.loads((run / "manifest.json").read_text())
    m["status"], m["error"] = "failed", "disk full"
    (run / "manifest.json").write_text(json.dumps(m))
    r = _report(run)
    assert r.returncode != 0 and "recording failed: disk full" in r.stderr


@pytest.mark.parametrize("gone", [0, 1])
def test_a_missing_rank_is_named_and_the_others_reported(tmp_path, gone):
    run = _two_ranks(tmp_path, f"missing-{gone}")
    shutil.rmtree(run / f"rank_{gone}")
    r = _report(run)
    assert r.returncode == 0, r.stderr
    assert f"rank {gone} missing" in r.stdout and "Step trace: 5 steps" in r.stdout
