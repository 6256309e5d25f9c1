"""``python -m annealing {inspect,convert,plot}``: see ``annealing.cli``."""

import sys

from .cli import main

sys.exit(main())
