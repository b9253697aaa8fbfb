"""scripts/load_test.py in the suite, small: concurrent clients against `genret serve` get exactly the answers
each query gets alone (nothing lost, nothing mixed), and the server batches them. Figures: docs/benchmarks.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"


def test_concurrent_clients_get_the_answers_each_query_gets_alone(served_pipe, tmp_path):
    served_pipe.save(tmp_path / "pipe")
    done = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "pipe"), "--clients", "1,8", "--requests", "24",
                           "--k", "3", "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)["rows"]
    assert [r["clients"] for r in rows] == [1, 8]
    assert all(r["mismatches"] == 0 and r["errors"] == 0 and r["requests"] == 24 for r in rows), rows
    assert rows[0]["mean_batch"] == 1 and rows[1]["mean_batch"] > 1  # eight clients: their requests share calls
