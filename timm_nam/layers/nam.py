"""NAM: Normalization-based Attention Module

Paper: `NAM: Normalization-based Attention Module` - https://arxiv.org/abs/2111.12419
Authors' code: https://github.com/Christian-lyc/NAM

Channel attention (Eq. 2) and spatial "pixel normalization" attention (Eq. 3), and their sequential combination
(channel then spatial, CBAM's order). Each gate is

    out = sigmoid(w * BN(x)) * x,    w = |scale| / sum(|scale|)

where BN is a batch norm whose scale (γ for channels, λ for pixels) also carries the sparsity penalty of Eq. 4
(`timm_nam.penalty`). In training the forward is the authors' formula. In eval mode ``w * BN(x)`` is a per-channel
(per-pixel) affine ``a * x + b``, so the gate runs as ``x * sigmoid(a * x + b)`` with the same numbers; ``fuse()``
folds it into a `NAMGate` for inference. The memory-efficient training form, a batch norm and its gate as one
module, is `timm_nam.layers.norm_nam`.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, to_2tuple

__all__ = ['NAMChannel', 'NAMSpatial', 'NAMChannelSpatial', 'NAMGate', 'nam_weights', 'affine']

# Keyword arguments timm's model builders pass to attention / SE layers. NAM has no reduction MLP, gate choice or
# activation, so these are accepted and ignored; anything else is a TypeError.
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
NAM_WEIGHTINGS = ('sum', 'mean')


def nam_weights(scale: torch.Tensor, detach: bool = True, weighting: str = 'sum') -> torch.Tensor:
    """NAM's importance weights: ``|scale| / sum(|scale|)`` (``weighting='sum'``, the paper and the authors' code) or
    ``|scale| / mean(|scale|)`` (``'mean'``: C times larger, so that the sigmoid's argument ``w·γ·x̂`` is of order 1
    instead of 1/C; the relative importances are the same).

    ``detach=True`` reproduces the authors' code, which reads ``bn.weight.data``: no gradient flows through the
    weights. If every scale is 0 the weights are 0, so the gate is sigmoid(0) = 0.5 (NAM's neutral, at-init value)
    instead of NaN (0/0 in the authors' code).
    """
    a = scale.abs()
    if detach:
        a = a.detach()
    total = a.sum()
    if weighting == 'mean':
        total = total / a.numel()
    return a / torch.where(total > 0, total, torch.ones_like(total))


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


def affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·x + b`` in ``x``'s dtype, ``a``, ``b`` per channel (C or (1, C, 1, 1) values) or per pixel ((1, 1, H, W)).
    Per channel it runs as ATen's eval-mode batch norm with zero mean, unit variance and eps 0 (exact): one pass,
    about twice as fast on a CPU as a broadcasting ``addcmul``."""
    if a.dim() == 1 or (a.shape[2] == 1 and a.shape[3] == 1):
        dtype = x.dtype if x.dtype == torch.float32 or x.dtype == torch.float64 else torch.float32
        a, b = a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)
        return F.batch_norm(x, torch.zeros_like(a), torch.ones_like(a), a, b, False, 0.0, 0.0)
    return torch.addcmul(b.to(x.dtype), x, a.to(x.dtype))


@register_notrace_function  # FX records the call; the in-place fast path runs on real tensors
def folded_gate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x · sigmoid(a·x + b)``: three element-wise passes; without autograd the output reuses the affine's buffer."""
    s = affine(x, a, b).sigmoid_()  # the affine's backward does not need its output
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
        return x * s
    return s.mul_(x)


class _NAMLayer(nn.Module):
    """What NAM's per-channel and per-pixel gates share: a batch norm over the gated features (channels or pixel
    positions), its importance weights, the eval-mode fold and the fused form, and the options (`NAMChannel`'s Args),
    checked here. ``shape`` is how a vector over those features broadcasts over an (N, C, H, W) input."""

    feat_size: Optional[Tuple[int, int]] = None  # per pixel: the (H, W) the gate is built for

    def __init__(
        self,
        channels: int,
        features: int,
        shape: Tuple[int, ...],
        grad_through_weights: bool = False,
        weighting: str = 'sum',
        eps: float = 1e-5,
        momentum: float = 0.1,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        unknown = sorted(set(kwargs) - _TIMM_ATTN_KWARGS)
        if unknown:
            raise TypeError(f'{type(self).__name__} got unexpected keyword argument(s): {", ".join(unknown)}')
        if weighting not in NAM_WEIGHTINGS:
            raise ValueError(
                f"{type(self).__name__} weighting must be 'sum' (|γ|/Σ|γ|, the paper's) or 'mean' (|γ|/mean|γ|), "
                f"got '{weighting}'"
            )
        self.channels = channels
        self.weighting = weighting
        self.grad_through_weights = grad_through_weights
        self.shape = shape
        self.bn = nn.BatchNorm2d(features, eps=eps, momentum=momentum, device=device, dtype=dtype)

    def weights(self) -> torch.Tensor:
        """The importance weights (`nam_weights`), constant for autograd unless ``grad_through_weights``."""
        return nam_weights(self.bn.weight, detach=not self.grad_through_weights, weighting=self.weighting)

    def fold(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode gate's coefficients: ``w·BN(x) = a·x + b``, per channel (1, C, 1, 1) or pixel (1, 1, H, W)."""
        bn = self.bn
        w = self.weights()
        a = w * bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return a.view(self.shape), (w * bn.bias - bn.running_mean * a).view(self.shape)

    def fuse(self) -> 'NAMGate':
        """This gate in its inference form, ``x · sigmoid(a·x + b)``; `timm.utils.reparameterize_model` calls it."""
        with torch.no_grad():
            a, b = self.fold()
        return NAMGate(a, b, channels=self.channels, feat_size=self.feat_size)

    def extra_repr(self) -> str:
        size = f', feat_size={self.feat_size}' if self.feat_size else ''
        options = f'weighting={self.weighting}, grad_through_weights={self.grad_through_weights}'
        return f'channels={self.channels}{size}, {options}'


class NAMChannel(_NAMLayer):
    """NAM channel attention (paper Eq. 2): ``sigmoid(|γ|/Σ|γ| · BN(x)) · x``.

    ``BN`` is a plain affine ``BatchNorm2d(channels)`` (γ init 1, β init 0): batch statistics in training, running
    statistics in eval, exactly as the authors' ``Channel_Att``. At init every weight is 1/C, so the module starts as a
    gate of about 0.5. Its state dict keeps the authors' layout (``bn.weight``, ``bn.running_mean``, ...).

    Args:
        channels: number of input channels C.
        grad_through_weights: if False (default, as the authors' code) the weighting is a constant for autograd and
            γ is trained only through BN's own ``γ·x̂ + β``; if True the gradient also flows through the weighting.
        weighting: 'sum' (default, the paper's ``|γ|/Σ|γ|``) or 'mean' (``|γ|/mean|γ|``, see `nam_weights`).
        eps, momentum: the batch norm's.
        device, dtype: factory kwargs.
        **kwargs: timm's attention-layer keywords (``act_layer``, ``rd_ratio``, ...) are accepted so the layer drops
            into ``attn_layer=`` / ``se_layer=`` slots; NAM has no MLP, so they are ignored.
    """

    def __init__(self, channels: int, **options):
        super().__init__(channels, channels, (1, -1, 1, 1), **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nam_input(x, self.channels, 'NAMChannel')
        if self.training:  # the authors' formula; a frozen or synced norm does its own thing here
            return x * torch.sigmoid(self.bn(x) * self.weights().view(self.shape).to(x.dtype))
        return folded_gate(x, *self.fold())


class NAMSpatial(_NAMLayer):
    """NAM spatial attention, "pixel normalization" (paper Eq. 3): ``sigmoid(|λ|/Σ|λ| · BN_s(x)) · x``.

    ``BN_s`` normalizes each of the H·W pixel positions with statistics over the batch *and* the channels and has one
    scale λ and shift β per pixel: the authors' deleted version applied ``BatchNorm1d(H·W)`` to ``x`` reshaped to
    (N, H·W, C). Here that is a ``BatchNorm2d(H·W)`` applied to ``x`` viewed as (N, H·W, C, 1): the same
    normalization and state, and a norm that timm's batch-norm utilities (freezing, sync-BN) convert. λ has H·W
    entries, so the layer only works at the feature size it was built for; another size raises a ValueError.

    Args:
        channels: number of input channels C (checked at run time).
        feat_size: (H, W) of the feature map this layer sees, or an int for square maps.
        grad_through_weights, weighting, eps, momentum, device, dtype, **kwargs: as in `NAMChannel`.
    """

    feat_size: Tuple[int, int]

    def __init__(self, channels: int, feat_size: Optional[Union[int, Tuple[int, int]]] = None, **options):
        if feat_size is None:
            raise TypeError(
                'NAMSpatial needs feat_size=(H, W): it has one scale per pixel position. Use '
                'functools.partial(NAMSpatial, feat_size=...) or a named model such as resnet50_nam_sp.'
            )
        self.feat_size = tuple(to_2tuple(feat_size))
        h, w = self.feat_size
        super().__init__(channels, h * w, (1, 1, h, w), **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_nam_input(x, self.channels, 'NAMSpatial')
        check_nam_feat_size(x, self.feat_size, 'NAMSpatial')
        if self.training:  # one norm feature per pixel: x viewed as (N, H·W, C, 1)
            z = self.bn(x.flatten(2).transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2).reshape(x.shape)
            return x * torch.sigmoid(z * self.weights().view(self.shape).to(x.dtype))
        return folded_gate(x, *self.fold())


class NAMChannelSpatial(nn.Module):
    """NAM with channel then spatial attention, in sequence (the paper adopts CBAM's integration).

    Args are those of `NAMSpatial`; both gates share ``grad_through_weights``, ``weighting``, ``eps``, ``momentum``,
    ``device`` and ``dtype``; timm's attention-layer keywords go to the channel gate, which checks and ignores them.
    """

    def __init__(self, channels: int, feat_size: Optional[Union[int, Tuple[int, int]]] = None, **options):
        super().__init__()
        self.channel = NAMChannel(channels, **options)
        shared = ('grad_through_weights', 'weighting', 'eps', 'momentum', 'device', 'dtype')
        self.spatial = NAMSpatial(channels, feat_size, **{k: v for k, v in options.items() if k in shared})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))

    def fuse(self) -> nn.Sequential:
        """Both gates in their inference form (see `NAMChannel.fuse`)."""
        return nn.Sequential(self.channel.fuse(), self.spatial.fuse())


class NAMGate(nn.Module):
    """A NAM gate folded for inference: ``x · sigmoid(a·x + b)``.

    Made by ``fuse()`` of `NAMChannel` / `NAMSpatial` (or `timm.utils.reparameterize_model`), which fold the
    importance weights, the batch norm's parameters and its running statistics into per-channel (shape (1, C, 1, 1))
    or per-pixel (shape (1, 1, H, W)) coefficients. It equals the eval-mode layer it came from and has no training
    behaviour: batch statistics are gone.
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, channels: int, feat_size: Optional[Tuple[int, int]] = None):
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


def __getattr__(name):
    if name == 'NAM':  # the name before 0.2: it read as NAM itself, whose usual form is channel attention
        import warnings

        warnings.warn('timm_nam.NAM is now NAMChannelSpatial', DeprecationWarning, stacklevel=2)
        return NAMChannelSpatial
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
