"""One exception hierarchy for MedGen.

Every error a user can cause carries a message that says what was expected, what was found and
what to do. The worker maps each class to an error ``kind`` and a distinct exit code
(see :mod:`medgen.jobs.exit_codes`).
"""

from __future__ import annotations

import errno


class MedGenError(Exception):
    """Base class of every error MedGen raises on purpose."""

    #: error kind reported in the job event stream
    kind = "internal"


class BadInputError(MedGenError, ValueError):
    """The input (file, volume, parameter, job spec) is not usable as given."""

    kind = "bad_input"


class GeometryMismatchError(BadInputError):
    """Two volumes that must share a voxel grid (image and label, source and mask) do not."""


class ModelError(MedGenError):
    """A model, checkpoint or adapter file is missing, corrupted or does not fit the network."""

    kind = "bad_input"


class OutOfMemoryError(MedGenError, MemoryError):
    """A computation ran out of GPU or host memory; the message suggests smaller settings."""

    kind = "oom"


class CancelledError(MedGenError):
    """The user cancelled the job (cancel file, SIGTERM or the runner killing the process tree)."""

    kind = "cancelled"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation: Python's ``MemoryError`` (MedGen's :class:`OutOfMemoryError`
    included), torch's ``OutOfMemoryError`` (CUDA), the plain ``RuntimeError`` that PyTorch's CPU allocator
    raises ("DefaultCPUAllocator: can't allocate memory") or C++'s ``std::bad_alloc`` - also when wrapped in
    another error as its cause (MONAI re-raises a failing transform as "applying transform ...")."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            return True
        message = str(error).lower()
        if isinstance(error, RuntimeError) and any(text in message for text in ("out of memory", "can't allocate memory",
                                                                               "bad_alloc")):
            return True
        # only a RuntimeError wraps: an error MedGen raised on purpose while handling another keeps its own kind
        error = (error.__cause__ or error.__context__) if isinstance(error, RuntimeError) else None
    return False


#: errno values of a file system refusing a write: read-only, no permission, full disk or quota, file too large
FILE_SYSTEM_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def cannot_write_message(error: BaseException) -> str | None:
    """What to tell the user about a write the file system refused (``None`` for any other error): the reason,
    the path when known, and what to do; it counts as bad input, not as MedGen's failure."""
    if not isinstance(error, OSError) or error.errno not in FILE_SYSTEM_ERRNOS:
        return None
    where = f": {error.filename}" if error.filename else ""
    return f"Writing the files failed ({error.strerror}{where}). Free disk space, or choose a folder you can write to."
