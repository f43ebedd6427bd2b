"""The jobs the Cross-Modal Translation panel starts.

Until the translation job kind exists, Apply runs the built-in ``selftest`` job, so the whole path
(export, worker, progress, import) is exercised; the translation issue replaces
:func:`apply_job_request` with the real request.
"""

from medgen.slicer.scene_job import JobRequest, selftest_request


def apply_job_request(input_volume) -> JobRequest:
    """The job Apply starts on ``input_volume``."""
    return selftest_request(input_volume, output_suffix="Translation")
