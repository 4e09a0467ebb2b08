"""Image similarity shared by the inversion attacks (what they report) and ARL (what its adversary
is scored with): SSIM of [0, 1] images, so a defense trains against the metric attacks measure.

SSIM is pytorch_msssim's (Wang et al., "Image quality assessment: from error visibility to
structural similarity", IEEE TIP 2004): Gaussian window 11 with sigma 1.5 and data range 1, the
window shrunk (odd) for images smaller than 11 pixels.
"""

from __future__ import annotations

import torch

__all__ = ["ssim01", "ssim_window"]


def ssim_window(height: int, width: int) -> int:
    """The Gaussian window: 11, or the largest odd size the image holds."""
    win = min(11, height, width)
    return win - (1 - win % 2)


def ssim01(recon: torch.Tensor, x01: torch.Tensor, *, per_image: bool = False) -> torch.Tensor:
    """SSIM of [0, 1] images (N, C, H, W): the mean (a scalar, differentiable) or, with
    ``per_image``, one value per image."""
    from pytorch_msssim import ssim

    return ssim(recon.float(), x01.float(), data_range=1.0, size_average=not per_image,
                win_size=ssim_window(x01.shape[-2], x01.shape[-1]))
