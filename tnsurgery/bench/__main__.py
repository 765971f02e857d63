"""``python -m tnsurgery.bench``: render benchmark records into the docs."""

import sys

from tnsurgery.bench.render import main

sys.exit(main())
