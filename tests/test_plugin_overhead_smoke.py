"""bench/plugin_overhead.py still runs every variant (a tiny N, one round).

Its figures depend on the machine and are no test; a bench that no longer
starts is found only when someone needs it, so this runs it as its
docstring says, as a subprocess, against the test server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent.parent / "bench" / "plugin_overhead.py"
VARIANTS = ("none", "prometheus", "prom+histogram", "otel-off", "otel")


def test_plugin_overhead_prints_every_variant(dsn: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--dsn", dsn, "--n", "500", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0] for line in done.stdout.splitlines()[3:]}
    assert set(VARIANTS) <= rows, done.stdout
