"""The core's pytest fixtures (a real PostgreSQL server, listeners cleaned up)."""

from __future__ import annotations

import os

# An installed plugin must join only the listeners that ask for it.
os.environ["CLASSIC_PG_LISTENER_DISABLE_PLUGIN_AUTOLOAD"] = "1"

pytest_plugins = ["classic.pg.listener.testing"]
