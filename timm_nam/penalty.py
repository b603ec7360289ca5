"""NAM's sparsity penalty (paper Eq. 4): ``p·Σ|γ| + p·Σ|λ|`` over NAM's own BN scales.

One definition, two ways to apply it, both exact in every training setup (fp32, bf16 autocast, fp16 with
GradScaler, gradient accumulation, DDP):

* `NAMSparsityLoss(criterion, model, p)`: adds the term to the loss, so it is scaled, unscaled,
  inf-checked and divided by the accumulation steps together with everything else. For training loops
  you write (and ``timm-nam train``).
* `enable_penalty(model, p)` (or the model kwarg ``nam_penalty=p``): an optimizer step pre-hook adds the
  term's gradient ``p·sign(γ)`` to every NAM scale just before ``optimizer.step()``. Step pre-hooks run
  after GradScaler's unscale and are skipped on inf/NaN steps, and a step happens once per accumulation
  cycle, after DDP's all-reduce. This is how timm's unmodified ``train.py`` gets the penalty:
  ``--device-modules timm_nam --model-kwargs nam_penalty=1e-4``. (One difference from the loss term:
  gradient clipping, which runs before the step, does not see the penalty gradient.)

Which p applies is decided in one place, `resolve_penalty` (``'paper'``, a number, the ``nam_penalty`` model kwarg).

A tensor hook on γ would be wrong: under GradScaler it sees the scaled gradient, and it fires once per
micro-batch. The authors' script never applied its penalty at all (it searched ``model._modules`` of a
``DataParallel`` wrapper for ``layer1...``).
"""

import math
from typing import Callable, Iterable, List, Union

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .layers.nam import NAMChannel, NAMSpatial

__all__ = [
    'PAPER_PENALTY',
    'nam_scales',
    'paper_penalty',
    'parse_penalty',
    'resolve_penalty',
    'l1_penalty',
    'add_penalty_grad_',
    'NAMSparsityLoss',
    'enable_penalty',
    'disable_penalty',
]

# p of Eq. 4 used in the paper, by model family
PAPER_PENALTY = {'resnet': 1e-4, 'mobilenet': 1e-3}


def _unwrap(model: nn.Module) -> nn.Module:
    """The trained model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def _reject_ema(model: nn.Module) -> None:
    if type(model).__name__.startswith('ModelEma'):
        raise TypeError(
            f'Got a {type(model).__name__}: the penalty belongs on the model being trained, not its EMA copy '
            '(the EMA weights receive no gradients).'
        )


def nam_scales(model: nn.Module) -> List[nn.Parameter]:
    """The scales γ (channel) and λ (pixel) of every NAM layer in ``model``, each once; nothing else. A layer whose
    batch norm is frozen (timm's ``freeze_batch_norm_2d`` turns its scale into a buffer) has no scale to penalize."""
    _reject_ema(model)
    seen, scales = set(), []
    for module in _unwrap(model).modules():
        if isinstance(module, (NAMChannel, NAMSpatial)):
            scale = module.bn.weight
            if isinstance(scale, nn.Parameter) and id(scale) not in seen:
                seen.add(id(scale))
                scales.append(scale)
    return scales


def paper_penalty(model: nn.Module) -> float:
    """The paper's p for ``model``'s family: 1e-4 for ResNets (CIFAR-100), 1e-3 for MobileNet-style nets."""
    model = _unwrap(model)
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    name = name.lower()
    if 'resnet' in name:
        return PAPER_PENALTY['resnet']
    if 'mobilenet' in name or 'efficientnet' in name:
        return PAPER_PENALTY['mobilenet']
    raise ValueError(f'No paper value of p for {name!r}; pass p explicitly.')


PenaltyValue = Union[float, str, None]


def parse_penalty(value: PenaltyValue) -> PenaltyValue:
    """The values p may take: None (not given), ``'paper'``, or a finite number >= 0 (also as text, as it comes from
    a command line or timm's ``--model-kwargs``)."""
    if value is None or value == 'paper':
        return value
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = math.nan
    if not math.isfinite(p) or p < 0:
        raise ValueError(f"penalty p must be 'paper' or a finite number >= 0, got {value!r}")
    return p


def resolve_penalty(model: nn.Module, p: PenaltyValue = None, model_kwarg: PenaltyValue = None) -> float:
    """The p that ``model`` trains with: the one rule behind every way of asking for the penalty.

    ``p`` is the value asked for directly (an argument, ``timm-nam train --nam-penalty``), ``model_kwarg`` the model
    kwarg ``nam_penalty``; both name the same p, so when both are given they must agree. Neither given, or
    ``'paper'``: the paper's value for the model's family, and 0 for a model without NAM layers (a baseline). An
    explicit p > 0 for a model without NAM layers is an error: there is nothing it could apply to.
    """
    p, model_kwarg = parse_penalty(p), parse_penalty(model_kwarg)
    if p is not None and model_kwarg is not None and p != model_kwarg:
        raise ValueError(f'two different penalties asked for: p = {p} and the model kwarg nam_penalty = {model_kwarg}')
    requested = p if p is not None else model_kwarg
    if not nam_scales(model):
        if requested in (None, 'paper', 0.0):
            return 0.0
        raise ValueError(f'{_no_nam_layers(model)} (p = {requested})')
    return paper_penalty(model) if requested in (None, 'paper') else requested


def _no_nam_layers(model: nn.Module) -> str:
    return f'{type(_unwrap(model)).__name__} has no NAM layers to penalize'


class _L1Penalty(torch.autograd.Function):
    """``p · Σ|s|`` over a list of tensors with one multi-tensor kernel each way (``torch._foreach_*``), instead of
    an abs, a sum and their backward per tensor: on a GPU the per-tensor kernels cost more than the arithmetic."""

    @staticmethod
    def forward(ctx, p: float, *scales: torch.Tensor) -> torch.Tensor:
        ctx.p = p
        ctx.save_for_backward(*scales)
        return torch.stack(torch._foreach_norm(scales, 1)).sum() * p

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads = torch._foreach_sign(ctx.saved_tensors)
        torch._foreach_mul_(grads, grad * ctx.p)
        return (None, *grads)


def l1_penalty(scales: Iterable[torch.Tensor], p: float) -> torch.Tensor:
    """``p · Σ|s|`` over all scales (a scalar tensor, differentiable)."""
    scales = list(scales)
    if not scales:
        return torch.zeros(())
    return _L1Penalty.apply(p, *scales)


@torch.no_grad()
def add_penalty_grad_(scales: Iterable[torch.Tensor], p: float) -> None:
    """Add ``∂(p·Σ|s|)/∂s = p·sign(s)`` to each scale's ``.grad`` (those with a gradient)."""
    with_grad = [s for s in scales if s.grad is not None]
    if with_grad and p:
        torch._foreach_add_([s.grad for s in with_grad], torch._foreach_sign(with_grad), alpha=p)


class NAMSparsityLoss(nn.Module):
    """``criterion(output, target) + p·Σ|γ| + p·Σ|λ|`` over ``model``'s NAM layers only.

    Args:
        criterion: the task loss, called as ``criterion(output, target)``.
        model: the model being trained (may be wrapped by DDP or torch.compile; not an EMA copy).
        p: penalty weight; None or 'paper' takes the paper's value for the model family (1e-4 ResNet, 1e-3
            MobileNetV2); see `resolve_penalty`.
    """

    def __init__(self, criterion: Callable, model: nn.Module, p: PenaltyValue = None):
        super().__init__()
        self.criterion = criterion
        self._scales = nam_scales(model)  # parameters are shared with every wrapper of the model
        if not self._scales:
            raise ValueError(_no_nam_layers(model))
        self.p = resolve_penalty(model, p)

    def penalty(self) -> torch.Tensor:
        return l1_penalty(self._scales, self.p)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        penalty = self.penalty()
        self.last_penalty = penalty.detach()  # for logging, without recomputing it
        return self.criterion(output, target) + penalty

    def extra_repr(self) -> str:
        return f'p={self.p}, num_scales={len(self._scales)}'


# ---- optimizer step pre-hook: for training loops whose loss we cannot wrap (timm's train.py) ----

_PENALTY_ATTR = '_nam_penalty'
_hook_handle = None


def _step_pre_hook(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    by_p = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            p = getattr(param, _PENALTY_ATTR, None)
            if p:
                by_p.setdefault(p, []).append(param)
    for p, params in by_p.items():
        add_penalty_grad_(params, p)


def enable_penalty(model: nn.Module, p: PenaltyValue = None) -> float:
    """Apply the penalty to ``model``'s NAM scales at every ``optimizer.step()`` of any optimizer that holds
    them. ``p=None`` or ``'paper'`` takes the paper's value (`resolve_penalty`). Returns p."""
    global _hook_handle
    scales = nam_scales(model)
    if not scales:
        raise ValueError(_no_nam_layers(model))
    p = resolve_penalty(model, p)
    for s in scales:
        setattr(s, _PENALTY_ATTR, p)
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_pre_hook(_step_pre_hook)
    return p


def disable_penalty(model: nn.Module) -> None:
    for s in nam_scales(model):
        if hasattr(s, _PENALTY_ATTR):
            delattr(s, _PENALTY_ATTR)
