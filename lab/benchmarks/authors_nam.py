"""The NAM authors' channel attention, as written in their repository (Christian-lyc/NAM, ``Channel_Att``).

Kept only as the speed baseline "authors' plain formula" for bench_attention.py; the library's own NAM is
`timm_nam.NAMChannel`. Numerically it equals NAMChannel (tests/test_layers.py checks the formula).
"""

import torch
import torch.nn as nn


class AuthorsChannelAtt(nn.Module):
    def __init__(self, channels: int, **kwargs):
        super().__init__()
        self.bn2 = nn.BatchNorm2d(channels, affine=True)

    def forward(self, x):
        residual = x
        x = self.bn2(x)
        weight_bn = self.bn2.weight.data.abs() / torch.sum(self.bn2.weight.data.abs())
        x = x.permute(0, 2, 3, 1).contiguous()
        x = torch.mul(weight_bn, x)
        x = x.permute(0, 3, 1, 2).contiguous()
        x = torch.sigmoid(x) * residual
        return x
