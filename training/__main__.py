"""``python -m training`` (in a clone; ``hear-brainsoundnet`` installed): the command line of
:mod:`training.cli`."""
import sys

from .cli import main

sys.exit(main())
