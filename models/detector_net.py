"""The IVD detector network: a small 2.5D U-Net over sagittal slices, one heatmap per level.

Input: three adjacent sagittal slices (the slice and its neighbours) resampled to a canonical
frame (``INPUT_SIZE`` pixels of ``INPUT_SPACING`` mm, head up, anterior left). Output, at the
input resolution: one heatmap logit per level L1-L2..L5-S1 (the level head: which disc is which
is decided by the channel, so the network must see from the sacrum up, hence five poolings to a
receptive field wider than the image), the disc-plane normal as two in-plane components, and the
disc's antero-posterior depth in units of ``DEPTH_SCALE`` mm. Heatmap targets are Gaussians in
three dimensions, so a slice's peak height also says how close it is to the disc's mid-plane.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CHANNELS", "DEPTH_SCALE", "INPUT_SIZE", "INPUT_SPACING", "LEVEL_COUNT", "DiscNet"]

LEVEL_COUNT = 5
INPUT_SIZE = 128
INPUT_SPACING = 2.5  # mm per input pixel: 320 mm field of view
DEPTH_SCALE = 50.0
CHANNELS = LEVEL_COUNT + 3  # heatmaps, normal (row, column), depth


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DiscNet(nn.Module):
    """U-Net with widths ``widths`` (one pooling between each), 3 input slices, CHANNELS outputs."""

    def __init__(self, widths: tuple[int, ...] = (16, 24, 32, 48, 64, 96)) -> None:
        super().__init__()
        self.widths = widths
        self.down = nn.ModuleList()
        cin = 3
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], CHANNELS, 1)
        bias = self.head.bias
        assert bias is not None
        with torch.no_grad():  # heatmaps start near the background rate (RetinaNet's prior)
            bias[:LEVEL_COUNT].fill_(-4.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (batch, CHANNELS, H, W) for inputs (batch, 3, H, W), H and W divisible by 32."""
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = nn.functional.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = self.up[i](torch.cat([x, skips[i]], dim=1))
        return self.head(x)
