"""Shared test configuration: the fixtures live in fix_*.py, as in psycopg's suite."""

from __future__ import annotations

import os

# Installed plugin distributions (CI installs plugins/*) must not join every
# listener of the core tests; the discovery tests turn autoload back on.
os.environ["CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD"] = "1"

pytest_plugins = [
    "classic.pg.listener.testing",
    "fix_plugins",
    "fix_proxy",
    "fix_server",
    # After fix_server, whose helpers it imports.
    "fix_pgbouncer",
]
