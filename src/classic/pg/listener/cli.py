"""Placeholder, replaced by the command line."""


def main() -> int:
    return 0
