"""Gradient magnitude similarity (GMS) and its multi-scale form (MSGMS), written once.

Xue, Zhang, Mou & Bovik (IEEE TIP 2014, "Gradient magnitude similarity deviation") compare two
images through their local gradient magnitudes. With the 3x3 Prewitt filters

    h_x = 1/3 [[1, 0, -1], [1, 0, -1], [1, 0, -1]],   h_y = h_x^T,

the gradient magnitude of an image I is ``g(I) = sqrt((I * h_x)^2 + (I * h_y)^2)`` (GMSD, eq. 1-2)
and the similarity of I and a reconstruction I_r at each pixel is (GMSD, eq. 4)

    GMS(I, I_r) = (2 g(I) g(I_r) + c) / (g(I)^2 + g(I_r)^2 + c),

1 where the gradients agree, towards 0 where one image has an edge the other lacks. ``c`` keeps
it stable in flat regions: GMSD uses c = 170 for images in [0, 255], i.e. 170 / 255^2 = 0.0026
for images in [0, 1] (the value RIAD's loss uses).

RIAD (Zavrtanik, Kristan & Skocaj, Pattern Recognition 2021, Sec. 3.2) evaluates GMS at four
scales (the image and its 1/2, 1/4 and 1/8 downsamplings) and

* trains with the multi-scale GMS loss ``L_G = 1/N_s sum_l 1/N_l sum_pixels (1 - GMS(I_l, I_r,l))``
  (:func:`msgms_loss`);
* maps anomalies with ``1 - MSGMS``, where the MSGMS map averages the per-scale GMS maps after
  upsampling them to the input size (:func:`msgms_map`).

Colour images are compared on their grey level (the channel mean), as the public RIAD
implementations do; the GMSD paper works on the luminance channel. The survey's AE-MSGMS row is
``az.create("ae", loss="msgms")``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: GMSD's stability constant 170 on [0, 255] images, rescaled to images in [0, 1]
C_GMS = 170.0 / 255.0**2
#: RIAD's scales: the image, then 1/2, 1/4, 1/8
N_SCALES = 4


def _prewitt(device, dtype) -> torch.Tensor:
    hx = torch.tensor([[1.0, 0.0, -1.0]] * 3, device=device, dtype=dtype) / 3
    return torch.stack([hx, hx.T])[:, None]  # [2, 1, 3, 3]: h_x, h_y


def grey(x: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, 1, H, W]``: the channel mean (a grey image stays as it is)."""
    return x.mean(1, keepdim=True) if x.shape[1] != 1 else x


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Prewitt gradient magnitude ``[N, 1, H, W]`` of the grey image (GMSD eq. 1-2), replicate padding."""
    x = grey(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), _prewitt(x.device, x.dtype))
    return g.pow(2).sum(1, keepdim=True).add(1e-12).sqrt()  # tiny offset: a finite gradient at g = 0


def gms_map(x: torch.Tensor, y: torch.Tensor, c: float = C_GMS) -> torch.Tensor:
    """GMS of two image batches, per pixel ``[N, 1, H, W]``, in (0, 1] (GMSD eq. 4)."""
    gx, gy = gradient_magnitude(x), gradient_magnitude(y)
    return (2 * gx * gy + c) / (gx.pow(2) + gy.pow(2) + c)


def _pyramid(x: torch.Tensor, scales: int) -> list[torch.Tensor]:
    out = [x]
    for _ in range(scales - 1):
        out.append(F.avg_pool2d(out[-1], 2) if min(out[-1].shape[-2:]) >= 2 else out[-1])
    return out


def msgms_map(x: torch.Tensor, y: torch.Tensor, scales: int = N_SCALES, c: float = C_GMS) -> torch.Tensor:
    """The MSGMS map ``[N, H, W]``: GMS at ``scales`` scales (each a 2x2 average of the one before),
    each upsampled bilinearly to the input size, averaged (RIAD Sec. 3.2). ``1 - msgms_map`` is RIAD's
    anomaly map before its mean filter."""
    h, w = x.shape[-2:]
    total = torch.zeros(x.shape[0], 1, h, w, device=x.device, dtype=torch.float32)
    for xl, yl in zip(_pyramid(x, scales), _pyramid(y, scales)):
        m = gms_map(xl, yl, c).float()
        total = total + (m if m.shape[-2:] == (h, w) else
                         F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False))
    return total[:, 0] / scales


def msgms_loss(x: torch.Tensor, y: torch.Tensor, scales: int = N_SCALES, c: float = C_GMS) -> torch.Tensor:
    """RIAD's multi-scale GMS loss: the mean over scales of the mean of ``1 - GMS`` at that scale."""
    per_scale = [(1 - gms_map(xl, yl, c)).mean() for xl, yl in zip(_pyramid(x, scales), _pyramid(y, scales))]
    return torch.stack(per_scale).mean()
