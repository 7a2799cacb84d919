"""examples/client.py run as a subprocess against the session server."""
import os
import subprocess
import sys
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "examples" / "client.py"


def _run(server, *args):
    return subprocess.run(
        [sys.executable, str(CLIENT), "--addr", server.addr, *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def test_client_infers_and_prints_labels(server, expected):
    labels = expected["tasks"]["sent"]["labels"]
    proc = _run(server, "--task", "sent", "--drop-first", "1", "a gripping film", "emoji 🎬 too")
    assert proc.returncode == 0, proc.stderr
    label_lines = [line for line in proc.stdout.splitlines() if "label=" in line]
    assert len(label_lines) == 2, proc.stdout
    assert all(any(f"label={l} " in line for l in labels) for line in label_lines), proc.stdout
    assert "scores=[" in proc.stdout and "dropped layers: 0" in proc.stdout


def test_client_lists_tasks_and_reports_errors(server, expected):
    proc = _run(server, "--list")
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if not line.startswith(" ")}
    assert set(expected["tasks"]) <= listed
    assert "[READY]" in proc.stdout

    bad = _run(server, "--task", "no-such-task", "hello")
    assert bad.returncode == 1
    assert "NOT_FOUND" in bad.stderr
