"""Triplet attention (TAM, a baseline of the NAM paper)

Paper: `Rotate to Attend: Convolutional Triplet Attention Module` - https://arxiv.org/abs/2010.03045
Shape follows the authors' code (github.com/landskape-ai/triplet-attention): three branches, each
a 7x7 conv + BN over the [max, mean] pooling of a rotated view of the input (C-W, H-C and H-W
planes), gating that view; the three gated outputs are averaged.
"""

import torch
import torch.nn as nn

__all__ = ['TripletAttention']


class _ZPoolGate(nn.Module):
    """sigmoid(BN(conv([max_c x, mean_c x]))) * x over dim 1 of its input."""

    def __init__(self, kernel_size: int = 7, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, device=device, dtype=dtype)
        # momentum 0.01 as in the reference implementation
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))


class TripletAttention(nn.Module):
    """Triplet attention; ``channels`` and timm's attention kwargs are accepted for slot compatibility."""

    def __init__(self, channels: int = 0, kernel_size: int = 7, device=None, dtype=None, **kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.gate_cw = _ZPoolGate(kernel_size, **dd)
        self.gate_hc = _ZPoolGate(kernel_size, **dd)
        self.gate_hw = _ZPoolGate(kernel_size, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_cw = self.gate_cw(x.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
        out_hc = self.gate_hc(x.permute(0, 3, 2, 1)).permute(0, 3, 2, 1)
        out_hw = self.gate_hw(x)
        return (out_cw + out_hc + out_hw) / 3.0
