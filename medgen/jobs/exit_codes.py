"""Distinct worker exit codes, one per outcome, and the error kind each stands for."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    OOM = 3
    CANCELLED = 4


#: error ``kind`` in the event stream -> exit code
EXIT_CODE_OF_KIND = {
    "internal": ExitCode.INTERNAL,
    "bad_input": ExitCode.BAD_INPUT,
    "oom": ExitCode.OOM,
    "cancelled": ExitCode.CANCELLED,
}
