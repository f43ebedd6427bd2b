"""Atomic output: all or nothing under the final name, and a clear error when a file blocks the folder."""

from __future__ import annotations

import os

import pytest

from medgen.errors import BadInputError
from medgen.io.atomic import _HOST_TAG, atomic_output, ensure_folder, write_text_atomic
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


def test_leftovers_of_a_killed_writer_are_swept_by_the_next_write(tmp_path):
    """A writer killed mid-write (e.g. SIGKILL after a cancel) leaves its temporary file; large weights must not pile up."""
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    orphan = tmp_path / f".unet.{dead_pid}-{_HOST_TAG}.abc123.part.safetensors"
    orphan.write_bytes(b"half of a checkpoint")
    untagged = tmp_path / f".unet.{dead_pid}.def456.part.safetensors"  # written before temporaries named their host
    untagged.write_bytes(b"half of an older checkpoint")
    other = tmp_path / ".vae.123.abc.part.safetensors"  # another file's temporary: not this write's business
    other.write_bytes(b"x")
    with atomic_output(tmp_path / "unet.safetensors") as temporary:
        assert temporary.name.startswith(f".unet.{os.getpid()}-{_HOST_TAG}.")
        temporary.write_bytes(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "unet.safetensors"]


def test_the_temporary_of_a_writer_on_another_machine_is_left_alone(tmp_path):
    """In a folder shared over the network, a process id says nothing about a writer on another machine: its
    temporary may be mid-write, so only this machine's leftovers are swept."""
    elsewhere = tmp_path / f".unet.{2**22 + 1}-0123abcd.abc123.part.safetensors"  # no such pid here
    elsewhere.write_bytes(b"being written on another machine")
    with atomic_output(tmp_path / "unet.safetensors") as temporary:
        temporary.write_bytes(b"weights")
    assert sorted(p.name for p in tmp_path.iterdir()) == [elsewhere.name, "unet.safetensors"]


def test_a_dotted_name_does_not_sweep_the_temporary_of_a_longer_dotted_name(tmp_path):
    """DICOM-UID-like names: writing "1.2.840.nrrd" must not read the "113619" of "1.2.840.113619.nrrd"'s live
    temporary as a dead writer's pid."""
    with atomic_output(tmp_path / "1.2.840.113619.nrrd") as longer:
        longer.write_bytes(b"a whole volume")
        write_text_atomic(tmp_path / "1.2.840.nrrd", "another file")
        assert longer.read_bytes() == b"a whole volume"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1.2.840.113619.nrrd", "1.2.840.nrrd"]


def test_the_temporary_of_a_writer_still_running_is_left_alone(tmp_path):
    """Only leftovers of writers that are gone are swept: a live process (here a stand-in that sleeps) may still be
    writing its temporary, and deleting it would make that writer's rename fail."""
    import subprocess

    writer = subprocess.Popen(["sleep", "30"])
    try:
        busy = tmp_path / f".unet.{writer.pid}-{_HOST_TAG}.abc123.part.safetensors"
        busy.write_bytes(b"being written")
        with atomic_output(tmp_path / "unet.safetensors") as temporary:
            temporary.write_bytes(b"weights")
        assert sorted(p.name for p in tmp_path.iterdir()) == [busy.name, "unet.safetensors"]
        assert busy.read_bytes() == b"being written"
    finally:
        writer.kill()
        writer.wait()


def test_a_text_write_that_fails_before_the_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    """write_text_atomic writes the temporary and renames it: when the rename fails (full or read-only disk) the
    reader still finds the previous text, never the new one half-written under the final name."""
    import os

    target = write_text_atomic(tmp_path / "report.json", "old")

    def failing_replace(source, destination):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_dotted_long_name_gets_a_temporary_name_within_the_limit(tmp_path):
    """The temporary name keeps only the real extension: a dotted stem must not be repeated in its suffix."""
    target = tmp_path / ("case." + "x" * 140 + "_0_image.nii.gz")
    with atomic_output(target) as temporary:
        assert temporary.name.endswith(".part.nii.gz") and len(temporary.name.encode()) <= 255
        temporary.write_bytes(b"volume")
    assert target.read_bytes() == b"volume"


def test_a_folder_held_by_this_process_is_named_as_such(tmp_path):
    from medgen.io.folder_lock import exclusive_folder

    with exclusive_folder(tmp_path / "job", "job folder") as folder:
        with pytest.raises(BadInputError, match="already in use by this process"):
            with exclusive_folder(folder, "job folder"):
                pass
    with exclusive_folder(folder, "job folder"):  # released: free again
        pass


def test_an_exclusive_write_never_replaces_a_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "run.json", "first", exclusive=True)
    with pytest.raises(FileExistsError):
        write_text_atomic(target, "second", exclusive=True)
    assert target.read_text() == "first" and sorted(path.name for path in tmp_path.iterdir()) == ["run.json"]
