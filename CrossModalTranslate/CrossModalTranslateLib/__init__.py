"""Scene-side logic of the Cross-Modal Translation module; no ``qt`` or ``ctk`` here, so it runs under slicer-core."""
