"""The benchmark still runs: a tiny N, no idle wait worth the name, no burst.

The benchmark is not a test (its figures depend on the machine), but a bench
that no longer starts is found only when someone needs it. This runs it the
way its README says, as a subprocess, against the test server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).parent.parent / "bench" / "run.py"
RECEIVERS = ("raw psycopg", "asyncpg", "Listener(0)", "Listener(pool)")


def test_bench_prints_a_table_with_every_receiver(dsn: str) -> None:
    done = subprocess.run(
        [
            *(sys.executable, str(RUN), "--dsn", dsn, "--n", "2000", "--repeat", "1"),
            *("--quick", "--idle", "0.2", "--latency-n", "300"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    table = done.stdout
    assert "sender ceiling" in table
    assert "PostgreSQL" in table
    for figure in ("throughput, backlog drain", "latency send->callback p50"):
        rows = [line for line in table.splitlines() if figure in line]
        assert rows, f"no {figure!r} row in:\n{table}"
    # Every receiver has a measured throughput, in the table's order.
    drain = table.split("throughput, backlog drain")[1].splitlines()[:4]
    for receiver, row in zip(RECEIVERS, drain, strict=True):
        assert receiver in row, table
        assert "n/a" not in row, table
    assert "[FAIL]" in table or "[PASS]" in table


def test_scaling_bench_prints_a_row_per_pool_size(dsn: str) -> None:
    done = subprocess.run(
        [
            *(sys.executable, str(RUN.parent / "scaling.py"), "--dsn", dsn),
            *("--n", "200", "--repeat", "1", "--sleep", "0.0005"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()[2:]
    assert [row.split()[0] for row in rows] == ["0", "1", "4", "16", "32"]
