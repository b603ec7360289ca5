"""A constant scale: the control for NAM's gate, which starts at 0.5 and (with the paper's weighting) stays there."""

import torch
import torch.nn as nn

__all__ = ['ConstantScale']


class ConstantScale(nn.Module):
    """``x · value``, no parameters; ``channels`` and timm's attention kwargs are accepted for timm's slots."""

    def __init__(self, channels: int = 0, value: float = 0.5, **kwargs):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value

    def extra_repr(self) -> str:
        return f'value={self.value}'
