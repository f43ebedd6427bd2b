"""Adapting pretrained 3D networks to a user's few volumes (the TenVOOSlicer capability):
segmentation models with their preprocessing, few-shot fine-tuning with any ``medgen.peft`` method,
inference and base-vs-adapted evaluation."""
