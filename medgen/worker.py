"""Entry point ``python -m medgen.worker JOB_DIR`` (see :mod:`medgen.jobs.worker`)."""

import sys

from medgen.jobs.worker import main

if __name__ == "__main__":
    sys.exit(main())
