"""Evaluation metrics, thin over MONAI: segmentation overlap/distance and image similarity."""

from medgen.metrics.images import psnr, ssim_3d
from medgen.metrics.segmentation import dice_per_class, hd95_per_class

__all__ = ["dice_per_class", "hd95_per_class", "psnr", "ssim_3d"]
