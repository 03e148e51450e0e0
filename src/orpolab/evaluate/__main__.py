"""``python -m orpolab.evaluate <sweep>``."""

import sys

from orpolab.evaluate.pipeline import main

sys.exit(main())
