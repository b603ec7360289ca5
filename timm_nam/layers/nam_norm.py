"""Batch norms that let the NAM gate right after them train without keeping a tensor of its own.

In every timm-nam model NAM follows a batch norm (ResNet bn3 / bn2, the projection BN of an inverted residual).
In eager training these norms compute exactly what ``nn.BatchNorm2d`` / timm's ``BatchNormAct2d`` compute, with
the same parameters, buffers and state-dict keys, and also publish on their output tensor its per-channel affine
relation to their input (``x = scale·y + shift``) and the batch mean and variance of ``x`` (see
`timm_nam.layers.nam_functional.NormOutput`). The gate then keeps the norm's input ``y`` for its backward (the
norm keeps ``y`` anyway) and recomputes ``x`` from it, and takes its own batch statistics from the norm's.

Anything else (eval mode, scripting, FX, torch.compile, an in-place change of the output, a norm
replaced by timm's ``freeze_batch_norm_2d`` or ``convert_sync_batchnorm``) leaves the output unmarked and the gate
falls back to keeping its input: still exact, one full-size tensor more.
"""

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d

from ._compat import register_notrace_module
from .nam_functional import NORM_OUTPUT_ATTR, NormOutput, eager_fast_path

__all__ = ['BatchNorm2dForNAM', 'BatchNormAct2dForNAM', 'for_nam']

_batch_norm_with_stats = getattr(torch.ops.aten, '_batch_norm_with_update', None)


def _publishing(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> bool:
    # also without grad: a gate must compute the same numbers whether or not autograd records (a reentrant
    # checkpoint runs the forward without grad, then again with it, and needs both runs to agree)
    return (
        bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and eager_fast_path(x)
        and x.dim() == 4
        and x.numel() > x.shape[1]
    )


def _normalize_and_publish(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor) -> torch.Tensor:
    """``bn(y)`` in training mode (batch statistics, running statistics and ``num_batches_tracked`` updated as
    ``nn.BatchNorm2d`` does), with the output marked for the NAM gate."""
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    if _batch_norm_with_stats is not None:  # dispatches to cuDNN / MIOpen where F.batch_norm would
        out, mean, invstd, _ = _batch_norm_with_stats(
            y, bn.weight, bn.bias, bn.running_mean, bn.running_var, factor, bn.eps
        )
    else:
        out, mean, invstd = torch.native_batch_norm(
            y, bn.weight, bn.bias, bn.running_mean, bn.running_var, True, factor, bn.eps
        )
    with torch.no_grad():
        # the statistics come in the parameters' precision (float32 for half-precision inputs)
        weight = torch.ones_like(mean) if bn.weight is None else bn.weight.detach().to(mean.dtype)
        bias = torch.zeros_like(mean) if bn.bias is None else bn.bias.detach().to(mean.dtype)
        scale = weight * invstd
        # var(x) = γ²·σ²/(σ²+ε), with σ²/(σ²+ε) = 1 - ε·invstd²
        var = weight.square() * (1 - bn.eps * invstd.square()).clamp_(min=0)
        record = NormOutput(y, scale, bias - mean * scale, bias, var, out._version)
    setattr(out, NORM_OUTPUT_ATTR, record)
    return out


class _PublishesForNAM:
    """TorchScript cannot compile these forwards (``super()``, tensor attributes); scripting gets the plain class
    with the same parameters, buffers and submodules, and the gate after it then runs its reference formula."""

    _plain_class: type

    def __prepare_scriptable__(self) -> nn.Module:
        plain = self._plain_class.__new__(self._plain_class)
        plain.__dict__.update(self.__dict__)
        return plain


@register_notrace_module  # a leaf for timm's FX feature extraction, as timm's own norm layers
class BatchNorm2dForNAM(_PublishesForNAM, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, in eager training, marks its output for a NAM gate that follows it."""

    _plain_class = nn.BatchNorm2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _publishing(self, x):
            return _normalize_and_publish(self, x)
        return super().forward(x)


@register_notrace_module
class BatchNormAct2dForNAM(_PublishesForNAM, BatchNormAct2d):
    """timm's ``BatchNormAct2d`` whose activation slot holds a NAM gate: in eager training the gate receives the
    marked norm output (timm's drop and act layers run unchanged)."""

    _plain_class = BatchNormAct2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _publishing(self, x):
            return self.act(self.drop(_normalize_and_publish(self, x)))
        return super().forward(x)


def for_nam(norm: nn.Module) -> nn.Module:
    """Make a plain ``nn.BatchNorm2d`` / ``BatchNormAct2d`` NAM-aware in place and return it (anything else is
    returned unchanged). Only the class changes, as ``torch.nn.utils.parametrize`` does it: parameters, buffers,
    submodules and state-dict keys stay the same objects."""
    cls: Optional[type] = {nn.BatchNorm2d: BatchNorm2dForNAM, BatchNormAct2d: BatchNormAct2dForNAM}.get(type(norm))
    if cls is not None:
        norm.__class__ = cls
    return norm
