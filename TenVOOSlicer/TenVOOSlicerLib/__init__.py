"""Scene-side logic of the TenVOO Fine-Tune module (:mod:`.adaptation`: fine-tune, segment, compare); no ``qt``
or ``ctk`` here, so it runs under slicer-core."""
