"""Scene-side logic of the TenVOO Fine-Tune module; no ``qt`` or ``ctk`` here, so it runs under slicer-core."""
