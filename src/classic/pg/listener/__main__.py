"""``python -m classic.pg.listener``: the ``pg-listener`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
