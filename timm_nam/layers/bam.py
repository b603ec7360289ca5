"""BAM: Bottleneck Attention Module (a baseline of the NAM paper)

Paper: `BAM: Bottleneck Attention Module` - https://arxiv.org/abs/1807.06514
Shape follows the authors' code (github.com/Jongchan/attention-module): a channel branch
(global average pool -> MLP with one BN'd hidden layer) and a spatial branch (1x1 reduce ->
two dilated 3x3 convs -> 1x1 to one map), combined as ``x * (1 + sigmoid(Mc + Ms))``.
BAM sits between stages, not inside blocks.
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
    """

    def __init__(
        self, channels: int, reduction: int = 16, dilation: int = 4, num_dilated_convs: int = 2, device=None, dtype=None
    ):
        super().__init__()
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
        return x * (1.0 + torch.sigmoid(mc + ms))
