"""``python -m relay`` runs the ``dbgrelay`` command line."""

import sys

from .cli import main

sys.exit(main())
