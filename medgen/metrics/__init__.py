"""Evaluation metrics, thin over MONAI: segmentation overlap/distance, image similarity, distributions."""

from medgen.metrics.distribution import frechet_distance, layer_features, maximum_mean_discrepancy, ms_ssim_3d
from medgen.metrics.images import psnr, ssim_3d
from medgen.metrics.segmentation import dice_per_class, dice_with_convention, hd95_per_class

__all__ = [
    "dice_per_class",
    "dice_with_convention",
    "frechet_distance",
    "hd95_per_class",
    "layer_features",
    "maximum_mean_discrepancy",
    "ms_ssim_3d",
    "psnr",
    "ssim_3d",
]
