"""Atomic file output: write to a temporary sibling, then rename into place.

A crash or cancellation mid-write leaves either the previous file or nothing, never half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from medgen.errors import BadInputError


def _process_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: the process's umask, read once at import (reading it means setting it, which is not thread-safe later)
_UMASK = _process_umask()
#: this machine, in temporary names: a process id says whether a writer is alive only on the machine that runs it,
#: so the sweep leaves alone the temporaries that other machines write into a shared (network) folder
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def ensure_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` and its parents unless they exist; :class:`BadInputError` when a file stands in the way."""
    folder = Path(folder)
    existing = next((path for path in (folder, *folder.parents) if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BadInputError(f"{existing} is a file, but a folder is needed there to write {folder}. Pick another output folder.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def flush_to_disk(path: str | os.PathLike) -> None:
    """Make the file's data durable before it is renamed into place: without it, a power cut after the rename can
    leave the final name holding an empty or partial file on some file systems."""
    descriptor = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))  # Windows flushes only handles open for writing
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_output(final_path: str | os.PathLike, suffix: str | None = None, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``final_path``; on success rename it to ``final_path``.

    Args:
        final_path: where the file must end up. Its folder is created if missing.
        suffix: suffix of the temporary file (default: the final path's extension, ``.nii.gz`` counted whole, so
            writers that pick the format from the extension still work).
        exclusive: only create ``final_path``, never replace it: of two processes writing it at once, one wins
            (a hard link; where the file system has none, a plain rename as without ``exclusive``).

    Raises:
        FileExistsError: ``exclusive`` and ``final_path`` exists (the other process's file is left as it is).
    """
    final_path = Path(final_path)
    ensure_folder(final_path.parent)
    if suffix is None:  # writers pick the format from the ending; a dotted stem ("case.1_image") is not part of it
        suffix = ".nii.gz" if final_path.name.endswith(".nii.gz") else final_path.suffix
    # the stem is cut so that the temporary name (about 40 bytes longer) stays within the 255-byte name limit; the
    # writer's pid and machine in the name let a later write sweep the leftovers of a killed one
    prefix = f".{final_path.stem[:100]}."
    _remove_orphaned_parts(final_path.parent, prefix, f".part{suffix}")
    handle, tmp_name = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-{_HOST_TAG}.", suffix=f".part{suffix}",
                                        dir=final_path.parent)
    os.close(handle)
    tmp_path = Path(tmp_name)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_UMASK)  # mkstemp makes the file private (0600); outputs get the usual permissions
        flush_to_disk(tmp_path)
        if exclusive:
            _link_or_replace(tmp_path, final_path)
        else:
            os.replace(tmp_path, final_path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _link_or_replace(tmp_path: Path, final_path: Path) -> None:
    try:
        os.link(tmp_path, final_path)  # atomic, and refused when final_path exists
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network shares, FAT): exclusivity is lost, atomicity is not
        os.replace(tmp_path, final_path)


def _remove_orphaned_parts(folder: Path, prefix: str, suffix: str) -> None:
    """Delete ``<prefix><pid>-<host>.<random><suffix>`` files of this machine's writers that are gone (killed
    mid-write, e.g. by the runner's SIGKILL after a cancel): large weights would otherwise pile up in model folders.
    Names without a host (``<prefix><pid>.``, written before the tag existed) count as this machine's. POSIX only."""
    if os.name != "posix":
        return
    # the whole name must fit: with a prefix alone, writing "1.2.840.nrrd" would read the "113619" of a live writer's
    # ".1.2.840.113619.<pid>-<host>.<random>.part.nrrd" as a dead pid (mkstemp's random part holds no dot)
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)(?:-([0-9a-f]{{8}}))?\.[^.]+{re.escape(suffix)}")
    for leftover in folder.iterdir():
        match = pattern.fullmatch(leftover.name)
        if match is None or match[2] not in (None, _HOST_TAG):
            continue
        pid = int(match[1])
        if pid != os.getpid() and not _process_alive(pid):
            with contextlib.suppress(OSError):
                leftover.unlink()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text_atomic(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (UTF-8); ``exclusive``: see :func:`atomic_output`."""
    with atomic_output(path, exclusive=exclusive) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl+C) and SIGTERM until the block ends, so that several files that belong together (a case
    and the index that counts it) are all written or none is; a signal that arrives meanwhile is raised again at the
    end, to whatever handler was there before.

    Only in the main thread (the one that may set signal handlers). SIGKILL cannot be held back: writers must still
    tolerate being killed between two files.
    """
    import signal
    import threading

    held = [signal.SIGINT, *([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])]
    # a handler installed outside Python (getsignal None) could not be put back
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(number) is None for number in held):
        yield
        return
    arrived: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: arrived.append(number)) for number in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)
