"""Entry point ``python -m medgen.worker JOB_DIR`` (see :mod:`medgen.jobs.worker`)."""

import logging
import os
import sys

from medgen.jobs.worker import main

if __name__ == "__main__":
    code = main()
    # The job is complete: its events, manifest and folder lock are closed. Skip the interpreter's teardown, which
    # spends 1-2.5 s unloading torch and MONAI after every job while the caller waits for the process to end.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
