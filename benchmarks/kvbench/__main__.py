"""``python -m kvbench ARGS`` is ``kvdispatch bench ARGS``."""

import sys

from .cli import bench

sys.exit(bench())
