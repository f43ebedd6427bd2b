"""The job the TenVOO Fine-Tune panel's Apply button (Setup section) starts: the built-in ``selftest``
on the Setup section's volume, which proves that torch, the worker and the import work. Fine-tuning,
segmenting and comparing have their own buttons (see :mod:`TenVOOSlicerLib.adaptation`).
"""

from medgen.slicer.scene_job import JobRequest, selftest_request


def apply_job_request(input_volume) -> JobRequest:
    """The job Apply starts on ``input_volume``."""
    return selftest_request(input_volume, output_suffix="TenVOO")
