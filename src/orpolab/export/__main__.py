"""``python -m orpolab.export <sweep>``."""

import sys

from orpolab.export.pipeline import main

sys.exit(main())
