"""BAM: Bottleneck Attention Module (a baseline of the NAM paper)

Paper: `BAM: Bottleneck Attention Module` - https://arxiv.org/abs/1807.06514
Branches as the BAM authors' code (github.com/Jongchan/attention-module): a channel branch (global average pool ->
MLP with one BN'd hidden layer) and a spatial branch (1x1 reduce -> two dilated 3x3 convs -> 1x1 to one map).
BAM sits between stages, not inside blocks.

How the branches combine differs between the paper and that code: the paper (Eq. 1-2) adds them,
``x * (1 + sigmoid(Mc + Ms))``; the code multiplies, ``x * (1 + sigmoid(Mc * Ms))``. The default is the paper's sum,
the method as published (our Imagenette rows use it); ``combine='product'`` is the code's. Parameters and FLOPs (the
NAM paper's Tables 1-2) are the same either way.
"""

import torch
import torch.nn as nn

__all__ = ['BAM']


class BAM(nn.Module):
    """Bottleneck attention module.

    Args:
        channels: input channels C.
        reduction: reduction ratio r of both branches (hidden width ``C // r``).
        dilation: dilation of the spatial branch's 3x3 convs.
        num_dilated_convs: number of dilated 3x3 convs in the spatial branch.
        combine: 'sum' (the paper: ``sigmoid(Mc + Ms)``) or 'product' (the BAM authors' code: ``sigmoid(Mc * Ms)``).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        num_dilated_convs: int = 2,
        combine: str = 'sum',
        device=None,
        dtype=None,
    ):
        super().__init__()
        if combine not in ('sum', 'product'):
            raise ValueError(f"BAM combine must be 'sum' (the paper) or 'product' (the authors' code), got '{combine}'")
        self.combine = combine
        dd = dict(device=device, dtype=dtype)
        hidden = max(channels // reduction, 1)
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
            nn.Linear(channels, hidden, **dd),
            nn.BatchNorm1d(hidden, **dd),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, **dd),
        )
        spatial = [
            nn.Conv2d(channels, hidden, 1, **dd),
            nn.BatchNorm2d(hidden, **dd),
            nn.ReLU(inplace=True),
        ]
        for _ in range(num_dilated_convs):
            spatial += [
                nn.Conv2d(hidden, hidden, 3, padding=dilation, dilation=dilation, **dd),
                nn.BatchNorm2d(hidden, **dd),
                nn.ReLU(inplace=True),
            ]
        spatial.append(nn.Conv2d(hidden, 1, 1, **dd))
        self.spatial_gate = nn.Sequential(*spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc = self.channel_gate(x)[:, :, None, None]
        ms = self.spatial_gate(x)
        return x * (1.0 + torch.sigmoid(mc * ms if self.combine == 'product' else mc + ms))

    def extra_repr(self) -> str:
        return f"combine='{self.combine}'"
