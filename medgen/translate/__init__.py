"""Cross-modality translation (MIDiffusion in 3D): the LMI operator, LMI-conditioned DDPM, SDEdit.

Kept import-light on purpose (no torch here): import the submodules you need, for example
``from medgen.translate.lmi import lmi_map``.
"""
