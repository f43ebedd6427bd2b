"""The jobs the Synthetic Data panel starts.

Until the synthesis job kind exists, Apply runs the built-in ``selftest`` job, so the whole path
(export, worker, progress, import) is exercised; the synthesis issue replaces
:func:`apply_job_request` with the real request.
"""

from medgen.slicer.volume_job import VolumeJobRequest, selftest_request


def apply_job_request(input_volume) -> VolumeJobRequest:
    """The job Apply starts on ``input_volume``."""
    return selftest_request(input_volume, output_suffix="Synthesis")
