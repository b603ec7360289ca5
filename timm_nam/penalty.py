"""NAM's sparsity penalty (paper Eq. 4): ``p·Σ|γ| + p·Σ|λ|`` over NAM's own BN scales.

`l1_penalty` is the one definition; two thin uses apply it, both exact in every training setup (fp32, bf16 autocast,
fp16 with GradScaler, gradient accumulation, DDP):

* `NAMSparsityLoss(criterion, model, p)` adds the term to the loss, so it is scaled, unscaled, inf-checked and divided
  by the accumulation steps with everything else. For training loops you write.
* `enable_penalty(model, p)` (or the model kwarg ``nam_penalty=p``) adds the term's gradient to the scales just
  before every ``optimizer.step()`` that updates them: an optimizer step pre-hook, which runs after GradScaler's
  unscale, is skipped on inf/NaN steps, and runs once per accumulation cycle, after DDP's all-reduce. This is how
  timm's unmodified ``train.py`` gets the penalty (``--model-kwargs nam_penalty=1e-4``). Gradient clipping, which
  runs before the step, does not see it. `disable_penalty`, or the model going away, removes the hook.

A tensor hook on γ would be wrong: under GradScaler it sees the scaled gradient, and it fires once per micro-batch.
The authors' script never applied its penalty at all (it searched ``model._modules`` of a ``DataParallel`` wrapper
for ``layer1...``).
"""

import math
import weakref
from typing import Callable, Iterable, List, Union

import torch
import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .layers.nam import NAMChannel, NAMSpatial
from .models._placement import model_name

__all__ = [
    'PAPER_PENALTY',
    'nam_scales',
    'paper_penalty',
    'parse_penalty',
    'resolve_penalty',
    'l1_penalty',
    'NAMSparsityLoss',
    'enable_penalty',
    'disable_penalty',
]

# p of Eq. 4 used in the paper, by the network it trained (`paper_penalty` says which applies to a network)
PAPER_PENALTY = {'resnet': 1e-4, 'mobilenet': 1e-3}
PenaltyValue = Union[float, str, None]


def _unwrap(model: nn.Module) -> nn.Module:
    """The trained model inside DDP / DataParallel / torch.compile wrappers; never its EMA copy."""
    if type(model).__name__.startswith('ModelEma'):
        raise TypeError(
            f'Got a {type(model).__name__}: the penalty belongs on the model being trained, not its EMA copy '
            '(the EMA weights receive no gradients).'
        )
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or hasattr(model, '_orig_mod'):
        model = model.module if hasattr(model, 'module') else model._orig_mod
    return model


def nam_scales(model: nn.Module) -> List[nn.Parameter]:
    """The scales γ (channel) and λ (pixel) of every NAM layer in ``model``, each once; nothing else. A layer whose
    batch norm is frozen (timm's ``freeze_batch_norm_2d`` turns its scale into a buffer) has no scale to penalize."""
    scales = {}
    for module in _unwrap(model).modules():
        if isinstance(module, (NAMChannel, NAMSpatial)) and isinstance(module.bn.weight, nn.Parameter):
            scales[id(module.bn.weight)] = module.bn.weight
    return list(scales.values())


def paper_penalty(model: nn.Module) -> float:
    """The paper's p for a network of ``model``'s build, decided by what it is built from, not by its name: 1e-3
    (the paper's MobileNetV2 on ImageNet) for networks with depthwise convolutions, as MobileNets, EfficientNets and
    other inverted-residual networks are; 1e-4 (the paper's ResNet-50 on CIFAR-100) for the others."""
    depthwise = any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in _unwrap(model).modules()
    )
    return PAPER_PENALTY['mobilenet' if depthwise else 'resnet']


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

    ``p`` is the value asked for directly, ``model_kwarg`` the model kwarg ``nam_penalty``; both name the same p, so
    when both are given they must agree. Neither given, or ``'paper'``: the paper's value for the network's build
    (`paper_penalty`), and 0 for a model without NAM layers (a baseline). An explicit p > 0 for a model without NAM
    layers is an error: there is nothing it could apply to.
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
    return f'{model_name(_unwrap(model))} has no NAM layers to penalize'


class _L1Penalty(torch.autograd.Function):
    """``p · Σ|s|`` over a list of tensors with one multi-tensor kernel each way (``torch._foreach_*``) instead of an
    abs, a sum and their backward per tensor: on a GPU the per-tensor kernels cost more than the arithmetic."""

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
    """``p · Σ|s|`` over all scales: a differentiable scalar, the penalty of Eq. 4."""
    scales = list(scales)
    return _L1Penalty.apply(p, *scales) if scales else torch.zeros(())


class NAMSparsityLoss(nn.Module):
    """``criterion(output, target) + p·Σ|γ| + p·Σ|λ|`` over ``model``'s NAM layers only.

    Args:
        criterion: the task loss, called as ``criterion(output, target)``.
        model: the model being trained (may be wrapped by DDP or torch.compile; not an EMA copy).
        p: penalty weight; None or 'paper' takes the paper's value for the network's build (`paper_penalty`: 1e-3
            with depthwise convolutions, else 1e-4); see `resolve_penalty`.
    """

    def __init__(self, criterion: Callable, model: nn.Module, p: PenaltyValue = None):
        super().__init__()
        self.criterion = criterion
        self._scales = nam_scales(model)  # parameters are shared with every wrapper of the model
        if not self._scales:
            raise ValueError(_no_nam_layers(model))
        self.p = resolve_penalty(model, p)

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        penalty = l1_penalty(self._scales, self.p)
        self.last_penalty = penalty.detach()  # for logging, without recomputing it
        return self.criterion(output, target) + penalty

    def extra_repr(self) -> str:
        return f'p={self.p}, num_scales={len(self._scales)}'


# ---- at every optimizer step: for training loops whose loss we cannot wrap (timm's train.py) ----

_penalized = WeakIdKeyDictionary()  # scale -> p; a model that goes away takes its entries with it
_hook = None


@torch.no_grad()
def _add_penalty_grads(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Step pre-hook: add ``∂ l1_penalty / ∂s`` to the gradient of every penalized scale this optimizer updates."""
    by_p = {}
    for group in optimizer.param_groups:
        for param in group['params']:
            p = _penalized.get(param)
            if p and param.grad is not None:
                by_p.setdefault(p, []).append(param)
    for p, params in by_p.items():
        with torch.enable_grad():
            grads = torch.autograd.grad(l1_penalty(params, p), params)
        torch._foreach_add_([s.grad for s in params], grads)


def enable_penalty(model: nn.Module, p: PenaltyValue = None) -> float:
    """Apply the penalty to ``model``'s NAM scales at every ``optimizer.step()`` of any optimizer that holds them.
    ``p=None`` or ``'paper'`` takes the paper's value (`resolve_penalty`). Returns p."""
    global _hook
    scales = nam_scales(model)
    if not scales:
        raise ValueError(_no_nam_layers(model))
    p = resolve_penalty(model, p)
    for s in scales:
        if s not in _penalized:
            weakref.finalize(s, _remove_hook_if_unused)
        _penalized[s] = p
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_add_penalty_grads)
    return p


def disable_penalty(model: nn.Module) -> None:
    """Stop `enable_penalty` for ``model``."""
    for s in nam_scales(model):
        _penalized.pop(s, None)
    _remove_hook_if_unused()


def _remove_hook_if_unused() -> None:
    """With no penalized scale left (disabled, or its model gone), the optimizer hook goes too."""
    global _hook
    if _hook is not None and not _penalized:
        _hook.remove()
        _hook = None
