"""``python -m engine``: the command-line face of Joule Planner."""

import sys

from engine.cli import main

sys.exit(main())
