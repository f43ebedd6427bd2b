"""One writer per folder: an advisory lock that the operating system releases when its process ends.

Two runs of one job folder (or two trainings into one checkpoint folder) would delete each other's temporary
files and interleave their checkpoints. The lock is ``fcntl.flock`` on POSIX and ``msvcrt.locking`` on Windows,
on a ``.lock`` file inside the folder, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

from medgen.errors import BadInputError
from medgen.io.atomic import ensure_folder

LOCK_FILE = ".lock"
#: folders this process holds (resolved paths)
_HELD: set[str] = set()


@contextlib.contextmanager
def exclusive_folder(folder: str | os.PathLike, what: str, wait_s: float = 0.0, on_wait=None) -> Iterator[Path]:
    """Hold ``folder`` for this process until the block ends.

    Args:
        folder: created if missing.
        what: how the message names the folder, e.g. ``"job folder"``.
        wait_s: how long to wait for another process to let go of it (0: refuse at once).
        on_wait: called once, with no argument, when the folder is busy and this call starts waiting.

    Raises:
        BadInputError: another live process holds it (still, after ``wait_s``).
    """
    folder = ensure_folder(folder)
    key = str(folder.resolve())
    if key in _HELD:  # the lock is per open file: this process would block itself
        raise BadInputError(f"The {what} {folder} is already in use by this process (a nested run on the same folder).")
    descriptor = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            _lock_within(descriptor, wait_s, on_wait)
        except OSError:
            raise BadInputError(
                f"The {what} {folder} is in use by another run (e.g. the same job started twice); wait for it to end "
                "or use another folder."
            ) from None
        _HELD.add(key)
        try:
            yield folder
        finally:
            _HELD.discard(key)
            _unlock(descriptor)
    finally:
        os.close(descriptor)


def _lock_within(descriptor: int, wait_s: float, on_wait) -> None:
    """:func:`_lock`, tried every 0.1 s for up to ``wait_s``; the last failure's ``OSError`` propagates."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _lock(descriptor)
        except OSError:
            if time.monotonic() >= deadline:
                raise
            if on_wait is not None:
                on_wait()
                on_wait = None
            time.sleep(0.1)


if os.name == "nt":
    import msvcrt

    def _lock(descriptor: int) -> None:
        msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)

    def _unlock(descriptor: int) -> None:
        os.lseek(descriptor, 0, os.SEEK_SET)
        msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _lock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(descriptor: int) -> None:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
