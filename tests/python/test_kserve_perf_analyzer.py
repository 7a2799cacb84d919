"""Smoke run of Triton's perf_analyzer (tritonclient 2.41.0 wheel, `make perf-analyzer`) against
the KServe endpoint: it must complete a short measurement with zero failed requests."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PERF_DIR = ROOT / "build" / "perf"
sys.path.insert(0, str(ROOT / "tools"))
bench_kserve = pytest.importorskip("bench_kserve")


def test_perf_analyzer_smoke_run_has_no_errors(server, tmp_path):
    if not (PERF_DIR / "bin" / "perf_analyzer").is_file():
        pytest.fail("perf_analyzer is not installed in build/perf: run `make perf-analyzer`", pytrace=False)
    ok0, fail0 = bench_kserve.server_counts(server.addr, "sent")
    data = bench_kserve.input_data(tmp_path / "data.json")
    extra = ["--measurement-interval", "800", "--max-trials", "8", "--stability-percentage", "100", "-b", "2"]
    row = bench_kserve.run_perf_analyzer(PERF_DIR, server.addr, "sent", data, 2, extra, tmp_path / "out.csv", 120)
    ok1, fail1 = bench_kserve.server_counts(server.addr, "sent")
    assert fail1 == fail0, row["stdout"]
    assert ok1 - ok0 > 10 and float(row["Inferences/Second"]) > 0
    # perf_analyzer read the server-side statistics (ModelStatistics) it prints.
    assert "Server:" in row["stdout"] and "compute infer" in row["stdout"]
