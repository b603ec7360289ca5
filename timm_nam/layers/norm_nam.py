"""A block's last batch norm and the NAM gate on its output, as one module: where NAM sits in every timm-nam model.

NAM gates the output of a batch norm (ResNet's bn3 / bn2, an inverted residual's projection norm, ...). Holding the
two together keeps NAM's gates where timm's batch-norm utilities (``freeze_batch_norm_2d``, the sync-BN converters,
``reparameterize_model``) reach them, and lets training keep no activation of the gate's own: `NormNAMMe` runs norm
and gate as one autograd Function that keeps only the norm's input, which the norm alone would keep too, and
recomputes the rest in backward. NAM's batch statistics then come from the norm's without a second reduction: the
batch mean of ``x = BN(y)`` is the norm's β and its biased variance γ²·σ²/(σ² + ε) (docs/usage.md).
`norm_nam()` picks the memory-efficient class unless timm's layer config asks for scriptable or exportable layers
(``timm.layers.set_layer_config``), as timm picks its ``_me`` activations.
"""

from typing import Optional

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, is_exportable, is_scriptable, register_notrace_module
from torch.autograd.function import once_differentiable

from .nam import NAMChannel, affine

__all__ = ['NormNAM', 'NormNAMMe', 'norm_nam']

_PLAIN_NORMS = (nn.BatchNorm2d, BatchNormAct2d)  # exactly these types: frozen or synced norms run as they are


class NormNAM(nn.Module):
    """``act(nam(norm(x)))``: a batch norm, the NAM gate on its output, and the activation that followed the norm
    in the block (``Identity`` for the linear norms that end most residual branches)."""

    def __init__(self, norm: nn.Module, nam: nn.Module, act: Optional[nn.Module] = None):
        super().__init__()
        self.norm = norm
        self.nam = nam
        self.act = nn.Identity() if act is None else act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.nam(self.norm(x)))


@register_notrace_module  # a leaf for FX (timm's feature extraction): the Function runs on real tensors
class NormNAMMe(NormNAM):
    """`NormNAM` that trains without keeping a tensor of the gate's own (see the module docstring). Eval mode, and
    norms that timm's utilities replaced (frozen, synced, folded gates), run `NormNAM`'s forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _fusable(self.norm, self.nam):
            return self.act(_NormGateFn.apply(x, self.norm.weight, self.norm.bias, *_gate_affine(self.nam), self))
        return self.act(self.nam(self.norm(x)))

    def __prepare_scriptable__(self) -> NormNAM:
        """TorchScript compiles no autograd Function: scripting gets `NormNAM` with the same submodules."""
        return NormNAM(self.norm, self.nam, self.act)


def norm_nam(norm: nn.Module, nam: nn.Module, act: Optional[nn.Module] = None) -> NormNAM:
    """The container for ``norm`` followed by ``nam``: memory-efficient where it applies and timm's layer config
    allows it (not scriptable, not exportable), `NormNAM` otherwise."""
    memory_efficient = (
        type(nam) is NAMChannel
        and type(norm) in _PLAIN_NORMS
        and norm.affine
        and norm.track_running_stats
        and all(isinstance(getattr(norm, m, None), (nn.Identity, type(None))) for m in ('drop', 'act'))
        and not (is_scriptable() or is_exportable())
    )
    return (NormNAMMe if memory_efficient else NormNAM)(norm, nam, act)


def _fusable(norm: nn.Module, nam: nn.Module) -> bool:
    # torch.compile traces the reference formula: inductor decides what to keep
    return (
        type(norm) in _PLAIN_NORMS
        and type(nam) is NAMChannel
        and type(nam.bn) is nn.BatchNorm2d
        and not torch.compiler.is_compiling()
    )


def _gate_affine(nam: NAMChannel):
    """The gate's effective scale and shift ``w·γ``, ``w·β``: their gradients reach γ (and w, if it is not detached)
    through autograd."""
    w = nam.weights()
    return w * nam.bn.weight, w * nam.bn.bias


def _count_batch(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count a training batch and return the running-average factor, as ``nn.BatchNorm2d`` does."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)


class _NormGateFn(torch.autograd.Function):
    """Training-mode ``x = BN(y)``, then ``x · sigmoid(BN'(x))`` with NAM's batch norm BN' (scale and shift already
    weighted), both norms' running statistics updated. Keeps ``y`` and per-channel vectors for backward."""

    @staticmethod
    def forward(ctx, y, norm_weight, norm_bias, gate_weight, gate_bias, module: NormNAM):
        norm, gate_bn = module.norm, module.nam.bn
        x, mean, invstd = torch.native_batch_norm(
            y, norm_weight, norm_bias, norm.running_mean, norm.running_var, True, _count_batch(norm), norm.eps
        )
        with torch.no_grad():  # NAM's batch statistics of x, from the norm's: mean β, variance γ²·σ²/(σ²+ε)
            x_mean = norm_bias.detach().to(mean.dtype)
            x_var = norm_weight.detach().to(mean.dtype).square() * (1 - norm.eps * invstd.square()).clamp_(min=0)
            x_invstd = torch.rsqrt(x_var + gate_bn.eps)
            n = y.numel() // y.shape[1]
            factor = _count_batch(gate_bn)
            gate_bn.running_mean.lerp_(x_mean.to(gate_bn.running_mean.dtype), factor)
            gate_bn.running_var.lerp_((x_var * (n / max(n - 1, 1))).to(gate_bn.running_var.dtype), factor)
            a = gate_weight.detach() * x_invstd
            out = affine(x, a, gate_bias.detach() - x_mean * a).sigmoid_().mul_(x)
        ctx.save_for_backward(y, norm_weight, norm_bias, mean, invstd, gate_weight, gate_bias, x_invstd)
        ctx.eps = norm.eps
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises a clear error instead of a wrong one
    def backward(ctx, grad):
        y, norm_weight, norm_bias, mean, invstd, gate_weight, gate_bias, x_invstd = ctx.saved_tensors
        scale = norm_weight.to(mean.dtype) * invstd
        x_mean = norm_bias.to(mean.dtype)
        x = affine(y, scale, x_mean - mean * scale)  # the norm's output, recomputed from its input
        a = gate_weight.to(mean.dtype) * x_invstd
        s = affine(x, a, gate_bias.to(mean.dtype) - x_mean * a).sigmoid_()
        grad_z = torch.ops.aten.sigmoid_backward(grad * x, s)  # grad·x·s·(1 - s)
        bn_backward = torch.ops.aten.native_batch_norm_backward
        grad_x, grad_gate_weight, grad_gate_bias = bn_backward(
            grad_z, x, gate_weight, None, None, x_mean, x_invstd, True, 0.0, [True, True, True]
        )
        grad_x = grad_x.addcmul_(s, grad)  # the product's direct term
        grad_y, grad_norm_weight, grad_norm_bias = bn_backward(
            grad_x, y, norm_weight, None, None, mean, invstd, True, ctx.eps, [True, True, True]
        )
        return (
            grad_y,
            grad_norm_weight.to(norm_weight.dtype),
            grad_norm_bias.to(norm_bias.dtype),
            grad_gate_weight.to(gate_weight.dtype),
            grad_gate_bias.to(gate_bias.dtype),
            None,
        )
