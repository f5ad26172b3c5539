"""``python -m bench``: see :mod:`bench.cli`."""

from .cli import run

run()
