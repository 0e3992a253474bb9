"""``python -m classic_pg_listener_outbox install --dsn ... [--table ...]``.

Creates the outbox table from a shell, as ``install()`` does: for deployment
scripts and migrations. The connection comes from ``--dsn``, else
``DATABASE_URL``, else the libpq variables (``PGHOST``...), as for
``pg-listener``. A failure is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg

from classic.pg.listener.cli import resolve_dsn

from ._schema import DEFAULT_TABLE, install


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m classic_pg_listener_outbox",
        description="Manage the outbox table of classic-pg-listener-outbox.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser(
        "install", help="create the outbox table and its index, unless they exist"
    )
    create.add_argument(
        "--dsn",
        help="libpq connection string or URI (default: $DATABASE_URL, else the"
        " PG* environment variables)",
    )
    create.add_argument(
        "--table", default=DEFAULT_TABLE, help=f"table name (default: {DEFAULT_TABLE})"
    )
    args = parser.parse_args(argv)
    try:
        with psycopg.connect(resolve_dsn(args.dsn), connect_timeout=10) as conn:
            install(conn, args.table)
    except (psycopg.Error, ValueError) as ex:
        print(f"error: {ex}".strip(), file=sys.stderr)
        return 2
    print(f"outbox table {args.table!r} is installed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
