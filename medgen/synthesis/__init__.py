"""Paired image + label synthesis: data preparation, joint latent diffusion, mask-conditioned
generation with quality filtering, and nnU-Net v2 dataset export."""
