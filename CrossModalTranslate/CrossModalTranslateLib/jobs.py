"""The job the Cross-Modal Translation panel's Apply button starts: the built-in ``selftest`` on the Setup
section's volume, which proves that torch, the worker and the import work. Translation and training
have their own buttons (see :mod:`CrossModalTranslateLib.translation`).
"""

from medgen.slicer.scene_job import JobRequest, selftest_request


def apply_job_request(input_volume) -> JobRequest:
    """The job Apply starts on ``input_volume``."""
    return selftest_request(input_volume, output_suffix="Translation")
