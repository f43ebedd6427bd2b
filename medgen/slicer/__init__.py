"""The scene bridge: MRML nodes <-> MedGen tensors/files, and the job runner.

No ``qt``/``ctk`` imports here (testable with slicer-core outside the Slicer app); ``slicer`` itself is
imported inside the functions that need it. KJI array order and IJK-to-RAS matrices are handled
here and nowhere else.
"""
