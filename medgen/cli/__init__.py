"""The ``medgen`` command line: thin over the same functions the worker and Slicer modules call."""
