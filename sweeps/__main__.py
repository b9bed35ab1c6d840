"""`python -m sweeps ...` is `python sweeps/run.py ...`."""

import sys

from sweeps.run import main

sys.exit(main())
