"""MedGen: generative AI for 3D medical images (adapters, paired synthesis, modality translation).

This package is import-light on purpose: importing ``medgen`` loads neither torch nor MONAI, so the
Slicer modules can import it before the heavy dependencies are installed.
"""

__version__ = "0.1.0"
