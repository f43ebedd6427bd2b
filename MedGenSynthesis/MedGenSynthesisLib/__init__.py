"""Scene-side logic of the Synthetic Data module; no ``qt`` or ``ctk`` here, so it runs under slicer-core."""
