"""SimAM: a parameter-free attention module (a like-for-like peer of NAM's channel gate)

Paper: `SimAM: A Simple, Parameter-Free Attention Module for Convolutional Neural Networks` (Yang et al., ICML 2021)
Authors' code: https://github.com/ZjjConan/SimAM

Each activation is gated by its energy within its channel's own spatial statistics:
``x · sigmoid((x - μ)² / (4·(v + λ)) + 0.5)`` with μ the channel's spatial mean and ``v = Σ(x - μ)² / (H·W - 1)``,
as in the authors' ``simam_module``.
"""

import torch
import torch.nn as nn

__all__ = ['SimAM']


class SimAM(nn.Module):
    """SimAM; ``channels`` and timm's attention kwargs are accepted so it fits timm's attention slots."""

    def __init__(self, channels: int = 0, e_lambda: float = 1e-4, **kwargs):
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = (x - x.mean(dim=(2, 3), keepdim=True)).square()
        v = d.sum(dim=(2, 3), keepdim=True) / (x.shape[2] * x.shape[3] - 1)
        return x * torch.sigmoid(d / (4 * (v + self.e_lambda)) + 0.5)

    def extra_repr(self) -> str:
        return f'e_lambda={self.e_lambda}'
