"""The job the Synthetic Data panel's Apply button starts: the built-in ``selftest`` on the Setup
section's volume, which proves that torch, the worker and the import work. Paired synthesis has its
own buttons (see :mod:`MedGenSynthesisLib.paired`).
"""

from medgen.slicer.scene_job import JobRequest, selftest_request


def apply_job_request(input_volume) -> JobRequest:
    """The job Apply starts on ``input_volume``."""
    return selftest_request(input_volume, output_suffix="Synthesis")
