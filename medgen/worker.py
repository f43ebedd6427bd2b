"""Entry point ``python -m medgen.worker JOB_DIR`` (see :mod:`medgen.jobs.worker`)."""

import logging
import os
import sys

# "python -m medgen.worker" puts the folder it was started in first on sys.path: a jsonschema.py there (a downloaded
# data set) would be imported in place of the library. The worker needs nothing from that folder (the runner also
# sets PYTHONSAFEPATH; this covers a worker started by hand, as the README shows).
if sys.path and not getattr(sys.flags, "safe_path", False) and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]

from medgen.jobs.worker import main  # noqa: E402 - after the sys.path repair above

if __name__ == "__main__":
    code = main()
    # The job is complete: its events, manifest and folder lock are closed. Skip the interpreter's teardown, which
    # spends 1-2.5 s unloading torch and MONAI after every job while the caller waits for the process to end.
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
