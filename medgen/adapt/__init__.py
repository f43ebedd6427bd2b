"""Adapting pretrained 3D networks to a user's few volumes (the TenVOOSlicer capability): few-shot fine-tuning
of segmentation models (:mod:`medgen.models.segmentation`) and DDPM generators with any ``medgen.peft`` method,
inference and base-vs-adapted evaluation."""
