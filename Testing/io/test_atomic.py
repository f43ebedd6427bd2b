"""Atomic output: all or nothing under the final name, and a clear error when a file blocks the folder."""

from __future__ import annotations

import pytest

from medgen.errors import BadInputError
from medgen.io.atomic import atomic_output, ensure_folder, write_text_atomic
from medgen.slicer.runner import write_job


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "deep" / "report.json", "old")
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_a_file_where_a_folder_is_needed_is_a_clear_error(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    for folder in (blocker, blocker / "sub" / "deeper"):
        with pytest.raises(BadInputError, match=f"{blocker} is a file, but a folder is needed there to write {folder}"):
            ensure_folder(folder)
    with pytest.raises(BadInputError, match="is a file, but a folder is needed"):
        write_text_atomic(blocker / "report.json", "{}")
    with pytest.raises(BadInputError, match="is a file, but a folder is needed"):
        write_job(blocker, "selftest", {"image": str(blocker)})
    assert ensure_folder(tmp_path / "a" / "b").is_dir()
