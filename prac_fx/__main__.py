"""``python -m prac_fx``: the ``prac-fx`` command line."""
import sys

from prac_fx.diff.cli import main

sys.exit(main())
