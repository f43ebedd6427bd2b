"""Qt-side helpers shared by the MedGen module panels.

This is the only part of :mod:`medgen` that imports ``qt``; it is used only by the module files
``<Module>.py`` inside Slicer. Everything testable without a GUI lives in :mod:`medgen.slicer`.
"""
