"""``python -m training``: the project's command line (see :mod:`training.cli`)."""
import sys

from .cli import main

sys.exit(main())
