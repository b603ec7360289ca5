"""NAM: Normalization-based Attention Module

Paper: `NAM: Normalization-based Attention Module` - https://arxiv.org/abs/2111.12419
Authors' code: https://github.com/Christian-lyc/NAM

Channel attention (Eq. 2) and spatial "pixel normalization" attention (Eq. 3), and their
sequential combination (channel then spatial, CBAM's order). Each gate is

    out = sigmoid(w * BN(x)) * x,    w = |scale| / sum(|scale|)

where BN is a batch norm whose scale (gamma for channels, lambda for pixels) also carries the
sparsity penalty of Eq. 4 (see `timm_nam.penalty`).

Implementation note: ``w * BN(x) = BN'(x)`` where BN' is the same normalization with scale
``w * gamma`` and shift ``w * beta``, with gradients identical to the plain formula. In eval mode that is one
per-channel (per-pixel) affine ``a * x + b``; ``fuse()`` folds it into a `NAMGate` for inference. In eager
training an autograd Function keeps one full-size tensor, or none after a NAM-aware norm (all in
`timm_nam.layers.nam_functional`). The parameters and running statistics live in an ordinary ``bn`` submodule, so
state dicts keep the authors' layout (``bn.weight``, ``bn.bias``, ``bn.running_mean``, ...).
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import to_2tuple

from ._compat import register_notrace_function
from .nam_functional import channel_gate_train, eager_fast_path, fold_gate, folded_gate, nam_gate, pixel_gate_train

__all__ = ['NAMChannel', 'NAMSpatial', 'NAM', 'NAMGate', 'nam_weights']

# Keyword arguments timm's model builders pass to attention / SE layers. NAM has no reduction MLP,
# gate choice or activation, so these are accepted and ignored; anything else is a TypeError.
_TIMM_ATTN_KWARGS = frozenset(
    {
        'act_layer',
        'rd_ratio',
        'rd_channels',
        'rd_divisor',
        'rd_round_fn',
        'gate_layer',
        'force_act_layer',
        'norm_layer',
        'bias',
        'mlp_bias',
        'se_ratio',
    }
)


def _check_timm_kwargs(layer_name: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _TIMM_ATTN_KWARGS)
    if unknown:
        raise TypeError(f'{layer_name} got unexpected keyword argument(s): {", ".join(unknown)}')


NAM_WEIGHTINGS = ('sum', 'mean')


def nam_weights(scale: torch.Tensor, detach: bool = True, weighting: str = 'sum') -> torch.Tensor:
    """NAM's importance weights: ``|scale| / sum(|scale|)`` (``weighting='sum'``, the paper and the authors' code) or
    ``|scale| / mean(|scale|)`` (``'mean'``: C times larger, so that the sigmoid's argument ``w·γ·x̂`` is of order 1
    instead of 1/C; the relative importances are the same).

    ``detach=True`` reproduces the authors' code, which reads ``bn.weight.data``: no gradient flows
    through the weights. If every scale is 0 the weights are defined as 0, so the gate is
    sigmoid(0) = 0.5 (NAM's neutral, at-init value) instead of NaN (0/0 in the authors' code).
    """
    a = scale.abs()
    if detach:
        a = a.detach()
    total = a.sum()
    if weighting == 'mean':
        total = total / a.numel()
    return a / torch.where(total > 0, total, torch.ones_like(total))


def _check_weighting(layer_name: str, weighting: str) -> None:
    if weighting not in NAM_WEIGHTINGS:
        raise ValueError(
            f"{layer_name} weighting must be 'sum' (|γ|/Σ|γ|, the paper's) or 'mean' (|γ|/mean|γ|), got '{weighting}'"
        )


# Public names: torch.fx only auto-wraps (does not trace into) functions whose names lack a leading '_'.
@register_notrace_function
def check_nam_input(x: torch.Tensor, channels: int, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f'{name} expects a 4D (N, C, H, W) input, got {x.dim()}D with shape {list(x.shape)}')
    if x.shape[1] != channels:
        raise ValueError(f'{name} was built for {channels} channels, got input with {x.shape[1]} channels')


@register_notrace_function
def check_nam_feat_size(x: torch.Tensor, feat_size: Tuple[int, int], name: str) -> None:
    if x.shape[2] != feat_size[0] or x.shape[3] != feat_size[1]:
        raise ValueError(
            f'{name} was built for {feat_size[0]}x{feat_size[1]} feature maps, got {x.shape[2]}x{x.shape[3]}. '
            f'Pixel attention has one scale per pixel position, so it only works at the input size the model '
            f'was created for: pass img_size= to timm.create_model to build it for another size.'
        )


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, process_group) -> torch.Tensor:
        import torch.distributed as dist

        ctx.process_group = process_group
        out = x.clone()
        dist.all_reduce(out, group=process_group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.process_group)
        return grad, None


def synced_world_size(process_group) -> int:
    """Processes a SyncBatchNorm syncs over (1 when torch.distributed is not running)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(process_group)


def synced_pixel_batch_stats(x: torch.Tensor, process_group) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pixel_batch_stats` over the batches of every process in ``process_group``, differentiable (the backward
    all-reduces too, as SyncBatchNorm's does)."""
    xs = x.flatten(2)
    if xs.dtype == torch.float16 or xs.dtype == torch.bfloat16:
        xs = xs.float()
    count = torch.full_like(xs[0, 0, :1], xs.shape[0] * xs.shape[1])
    sums = _AllReduceSum.apply(torch.cat([xs.sum(dim=(0, 1)), xs.square().sum(dim=(0, 1)), count]), process_group)
    hw = xs.shape[2]
    n = sums[-1]
    mean = sums[:hw] / n
    var = (sums[hw : 2 * hw] / n - mean.square()).clamp(min=0)
    return mean, var, var * (n / (n - 1).clamp(min=1))


@register_notrace_function
def pixel_batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pixel mean, biased and unbiased variance over batch and channels, in at least fp32: the
    statistics of ``BatchNorm1d(H*W)`` applied to ``x`` reshaped to (N, H*W, C)."""
    xs = x.flatten(2)
    if xs.dtype == torch.float16 or xs.dtype == torch.bfloat16:
        xs = xs.float()
    var, mean = torch.var_mean(xs, dim=(0, 1), unbiased=False)
    n = xs.shape[0] * xs.shape[1]
    return mean, var, var * (n / max(n - 1, 1))


class _NAMGate(nn.Module):
    """What the channel and pixel gates share: a batch norm whose scale gives the importance weights."""

    # subclasses set self.bn (a batch norm)

    def __init__(self, channels: int, grad_through_weights: bool, weighting: str, kwargs: dict):
        super().__init__()
        _check_timm_kwargs(type(self).__name__, kwargs)
        _check_weighting(type(self).__name__, weighting)
        self.channels = channels
        self.grad_through_weights = grad_through_weights
        self.weighting = weighting

    def weights(self) -> torch.Tensor:
        """The importance weights (`nam_weights`), constant for autograd unless ``grad_through_weights``."""
        return nam_weights(self.bn.weight, detach=not self.grad_through_weights, weighting=self.weighting)

    def _uses_batch_stats(self) -> bool:
        """Training with a live batch norm. A norm frozen by timm's ``freeze_batch_norm_2d`` (a
        ``FrozenBatchNorm2d``, which has no batch counter) always uses its running statistics, as a frozen norm does."""
        return self.training and hasattr(self.bn, 'num_batches_tracked')

    def _count_batch(self) -> float:
        """Count a training batch and return the running-average factor, as nn.BatchNorm does."""
        num_batches_tracked = self.bn.num_batches_tracked
        assert num_batches_tracked is not None
        num_batches_tracked.add_(1)
        momentum = self.bn.momentum
        return 1.0 / float(num_batches_tracked) if momentum is None else float(momentum)


class NAMChannel(_NAMGate):
    """NAM channel attention (paper Eq. 2): ``sigmoid(|γ|/Σ|γ| · BN(x)) · x``.

    ``BN`` is a plain affine ``BatchNorm2d(channels)`` (γ init 1, β init 0): batch statistics in
    training, running statistics in eval, exactly as the authors' ``Channel_Att``. At init every
    weight is 1/C, so the module starts as a gate of about 0.5.

    Args:
        channels: number of input channels C.
        grad_through_weights: if False (default, as the authors' code) the weighting ``|γ|/Σ|γ|`` is
            a constant for autograd and γ is trained only through BN's own ``γ·x̂ + β``; if True the
            gradient also flows through the weighting.
        weighting: 'sum' (default, the paper's ``|γ|/Σ|γ|``) or 'mean' (``|γ|/mean|γ|``, see `nam_weights`).
        eps, momentum: the batch norm's.
        device, dtype: factory kwargs.
        **kwargs: timm's attention-layer keywords (``act_layer``, ``rd_ratio``, ...) are accepted so the
            layer drops into ``attn_layer=`` / ``se_layer=`` slots; NAM has no MLP, so they are ignored.
    """

    def __init__(
        self,
        channels: int,
        grad_through_weights: bool = False,
        weighting: str = 'sum',
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(channels, grad_through_weights, weighting, kwargs)
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nam_input(x, self.channels, 'NAMChannel')
        bn = self.bn
        w = self.weights()
        if not torch.jit.is_scripting():
            if isinstance(bn, nn.SyncBatchNorm):
                # converted by convert_sync_batchnorm (train.py --sync-bn): let it sync its statistics
                return nam_gate(x, bn(x) * w.view(1, -1, 1, 1))
        if not self._uses_batch_stats():
            a, b = fold_gate(bn.weight * w, bn.bias * w, bn.running_mean, bn.running_var, bn.eps)
            return folded_gate(x, a.view(1, -1, 1, 1), b.view(1, -1, 1, 1))
        factor = self._count_batch()
        if not torch.jit.is_scripting():
            if eager_fast_path(x):
                return channel_gate_train(
                    x, bn.weight * w, bn.bias * w, bn.running_mean, bn.running_var, factor, bn.eps
                )
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight * w, bn.bias * w, True, factor, bn.eps)
        return nam_gate(x, y)

    def fuse(self) -> 'NAMGate':
        """This gate in its inference form: ``x · sigmoid(a·x + b)`` with per-channel ``a, b`` folded from the
        batch norm's parameters and running statistics. `timm.utils.reparameterize_model` calls it."""
        bn = self.bn
        with torch.no_grad():
            w = self.weights()
            a, b = fold_gate(bn.weight * w, bn.bias * w, bn.running_mean, bn.running_var, bn.eps)
        return NAMGate(a.view(1, -1, 1, 1), b.view(1, -1, 1, 1), channels=self.channels)

    def extra_repr(self) -> str:
        return f'channels={self.channels}, grad_through_weights={self.grad_through_weights}, weighting={self.weighting}'


class NAMSpatial(_NAMGate):
    """NAM spatial attention, "pixel normalization" (paper Eq. 3): ``sigmoid(|λ|/Σ|λ| · BN_s(x)) · x``.

    ``BN_s`` normalizes each of the H·W pixel positions with statistics over the batch *and* the
    channels and has one scale λ and shift β per pixel: the authors' deleted version applied
    ``BatchNorm1d(H·W)`` to ``x`` reshaped to (N, H·W, C). Parameters and running statistics are kept
    in a batch norm over H·W features (``bn``, same state), so λ has H·W entries and the layer only works at the feature
    size it was built for; another size raises a ValueError naming both sizes.

    Args:
        channels: number of input channels C (checked at run time).
        feat_size: (H, W) of the feature map this layer sees, or an int for square maps.
        grad_through_weights, weighting, eps, momentum, device, dtype, **kwargs: as in `NAMChannel`.
    """

    def __init__(
        self,
        channels: int,
        feat_size: Optional[Union[int, Tuple[int, int]]] = None,
        grad_through_weights: bool = False,
        weighting: str = 'sum',
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__(channels, grad_through_weights, weighting, kwargs)
        if feat_size is None:
            raise TypeError(
                'NAMSpatial needs feat_size=(H, W): it has one scale per pixel position. Use '
                'functools.partial(NAMSpatial, feat_size=...) or a named model such as resnet50_nam_sp.'
            )
        self.feat_size = tuple(to_2tuple(feat_size))
        num_pixels = self.feat_size[0] * self.feat_size[1]
        # The statistics are computed here (per pixel, over batch and channels); the norm module holds λ, β and the
        # running statistics with the authors' keys and shapes. It is a BatchNorm2d over H·W features (the authors'
        # BatchNorm1d(H·W) has the same state) so that timm's freeze_batch_norm_2d and the sync-BN converters see it.
        self.bn = nn.BatchNorm2d(num_pixels, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nam_input(x, self.channels, 'NAMSpatial')
        check_nam_feat_size(x, self.feat_size, 'NAMSpatial')
        bn = self.bn
        h, w_ = self.feat_size
        w = self.weights()
        running_mean, running_var = bn.running_mean, bn.running_var
        assert running_mean is not None and running_var is not None
        if not self._uses_batch_stats():
            a, b = fold_gate(bn.weight * w, bn.bias * w, running_mean, running_var, bn.eps)
            return folded_gate(x, a.view(1, 1, h, w_), b.view(1, 1, h, w_))
        if not torch.jit.is_scripting():
            if isinstance(bn, nn.SyncBatchNorm) and synced_world_size(bn.process_group) > 1:
                # converted by convert_sync_batchnorm: statistics over the global batch, gradients through them
                mean, var, var_unbiased = synced_pixel_batch_stats(x, bn.process_group)
                with torch.no_grad():
                    self._update_running_stats(mean, var_unbiased)
                return nam_gate(x, self._pixel_affine(x, w, mean, var))
            if eager_fast_path(x):
                with torch.no_grad():
                    mean, var, var_unbiased = pixel_batch_stats(x)
                    self._update_running_stats(mean, var_unbiased)
                return pixel_gate_train(x, bn.weight * w, bn.bias * w, mean, var, bn.eps)
        mean, var, var_unbiased = pixel_batch_stats(x)
        with torch.no_grad():
            self._update_running_stats(mean, var_unbiased)
        return nam_gate(x, self._pixel_affine(x, w, mean, var))

    def _pixel_affine(self, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``w * BN_s(x)`` with batch statistics, as one per-pixel affine ``a * x + b``."""
        bn = self.bn
        h, w_ = self.feat_size
        a = w * bn.weight * torch.rsqrt(var + bn.eps)
        b = w * bn.bias - mean * a
        return torch.addcmul(b.to(x.dtype).view(1, 1, h, w_), x, a.to(x.dtype).view(1, 1, h, w_))

    def _update_running_stats(self, mean: torch.Tensor, var_unbiased: torch.Tensor) -> None:
        running_mean, running_var = self.bn.running_mean, self.bn.running_var
        assert running_mean is not None and running_var is not None
        factor = self._count_batch()
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_(var_unbiased.to(running_var.dtype), factor)

    def fuse(self) -> 'NAMGate':
        """This gate in its inference form, with per-pixel ``a, b`` (see `NAMChannel.fuse`)."""
        bn = self.bn
        h, w_ = self.feat_size
        with torch.no_grad():
            w = self.weights()
            a, b = fold_gate(bn.weight * w, bn.bias * w, bn.running_mean, bn.running_var, bn.eps)
        return NAMGate(a.view(1, 1, h, w_), b.view(1, 1, h, w_), channels=self.channels, feat_size=self.feat_size)

    def extra_repr(self) -> str:
        return (
            f'channels={self.channels}, feat_size={self.feat_size}, '
            f'grad_through_weights={self.grad_through_weights}, weighting={self.weighting}'
        )


class NAM(nn.Module):
    """NAM with channel then spatial attention, in sequence (the paper adopts CBAM's integration).

    Args are those of `NAMSpatial`; both submodules share ``grad_through_weights``, ``weighting``, ``eps`` and
    ``momentum``.
    """

    def __init__(
        self,
        channels: int,
        feat_size: Optional[Union[int, Tuple[int, int]]] = None,
        grad_through_weights: bool = False,
        weighting: str = 'sum',
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        _check_timm_kwargs(type(self).__name__, kwargs)
        common = dict(
            grad_through_weights=grad_through_weights,
            weighting=weighting,
            eps=eps,
            momentum=momentum,
            device=device,
            dtype=dtype,
        )
        self.channel = NAMChannel(channels, **common)
        self.spatial = NAMSpatial(channels, feat_size=feat_size, **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

    def fuse(self) -> nn.Sequential:
        """Both gates in their inference form (see `NAMChannel.fuse`)."""
        return nn.Sequential(self.channel.fuse(), self.spatial.fuse())


class NAMGate(nn.Module):
    """A NAM gate folded for inference: ``x · sigmoid(a·x + b)``.

    Made by ``fuse()`` of `NAMChannel` / `NAMSpatial` (or `timm.utils.reparameterize_model`), which fold the
    importance weights, the batch norm's parameters and its running statistics into per-channel (shape
    (1, C, 1, 1)) or per-pixel (shape (1, 1, H, W)) coefficients. It equals the eval-mode layer it came from and
    has no training behaviour: batch statistics are gone.
    """

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        channels: int,
        feat_size: Optional[Tuple[int, int]] = None,
    ):
        super().__init__()
        if a.dim() != 4 or a.shape != b.shape:
            raise ValueError(
                f'NAMGate needs a and b of one 4D broadcast shape, got {list(a.shape)} and {list(b.shape)}'
            )
        self.channels = channels
        self.feat_size = None if feat_size is None else tuple(to_2tuple(feat_size))
        self.register_buffer('a', a.detach().clone())
        self.register_buffer('b', b.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nam_input(x, self.channels, 'NAMGate')
        feat_size = self.feat_size
        if feat_size is not None:
            check_nam_feat_size(x, feat_size, 'NAMGate')
        return folded_gate(x, self.a, self.b)

    def extra_repr(self) -> str:
        kind = 'per channel' if self.feat_size is None else f'per pixel, feat_size={self.feat_size}'
        return f'channels={self.channels}, {kind}'
