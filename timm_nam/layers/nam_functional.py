"""NAM's gate math: the reference formula, the memory-efficient training path and the folded inference form.

Every NAM gate is ``out = sigmoid(z) * x`` with ``z = w·BN(x)``, and ``w·BN(x)`` is itself a batch norm with scale
``w·γ`` and shift ``w·β`` (per channel, or per pixel for NAMSpatial). Three forms of that one computation live here:

* `nam_gate`: ``sigmoid(logits) * x`` once the logits exist (the reference path, used when scripting, tracing or
  compiling, where autograd or inductor decides what to keep).
* `channel_gate_train` / `pixel_gate_train`: training in eager mode through an autograd Function that keeps one
  full-size tensor (the gate's input) and recomputes the normalised input and the sigmoid in backward. Autograd of
  the reference path keeps two (the input and the sigmoid). When the input comes straight from a batch norm that
  published its statistics (`timm_nam.layers.nam_norm`), the Function keeps that norm's *input* instead, which
  the norm keeps anyway, so the gate adds no full-size tensor at all; the channel gate then also takes its batch
  statistics from the norm's (mean of ``x`` = β, variance = γ²·σ²/(σ²+ε)) instead of reducing over ``x`` again.
* `fold_gate`: eval-mode coefficients ``a, b`` with ``out = x · sigmoid(a·x + b)`` (`NAMGate`).
"""

import functools
import importlib.util
import os
from typing import NamedTuple, Optional, Tuple

import torch
from timm.layers import is_exportable, is_scriptable
from torch.autograd.function import once_differentiable

from ._compat import register_notrace_function

__all__ = [
    'nam_gate',
    'NormOutput',
    'published_norm_output',
    'channel_gate_train',
    'pixel_gate_train',
    'fold_gate',
    'folded_gate',
    'eager_fast_path',
]

# the attribute under which a batch norm publishes its input and statistics on its output tensor
NORM_OUTPUT_ATTR = '_nam_norm_output'


def eager_fast_path(x: torch.Tensor) -> bool:
    """True when ``x`` is a real tensor in eager execution: not scripting, not FX-tracing, not compiling, and timm's
    layer config not set to scriptable or exportable (``timm.layers.set_layer_config``, which also makes timm use
    its plain activations instead of the memory-efficient ones). The autograd Functions (once differentiable) and
    the tensor attribute they read belong to eager mode; everywhere else the reference formula runs, and autograd or
    inductor decide what to keep."""
    if torch.jit.is_scripting():
        return False
    if isinstance(x, torch.fx.Proxy) or torch.compiler.is_compiling():
        return False
    return not (is_scriptable() or is_exportable())


@register_notrace_function
def nam_gate(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits) * x``, reusing the buffer of ``logits`` (a temporary nobody else holds): the sigmoid is
    in place (its producer's backward does not need it), and without autograd so is the product. This saves
    one or two full-size allocations per call; the arithmetic is unchanged."""
    s = logits.sigmoid_()
    if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
        return x * s  # autograd keeps s for the product's backward
    return s.mul_(x)


class NormOutput(NamedTuple):
    """What a training-mode batch norm publishes on its output ``x``: ``x = scale·input + shift`` per channel, and
    the batch mean and biased variance of ``x`` per channel. ``version`` is ``x._version`` at publication, so an
    in-place change of ``x`` afterwards invalidates the record."""

    input: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    var: torch.Tensor
    version: int


def published_norm_output(x: torch.Tensor) -> Optional[NormOutput]:
    """The record a batch norm published on ``x``, if ``x`` is still exactly that norm's output."""
    record = getattr(x, NORM_OUTPUT_ATTR, None)
    if record is None or record.version != x._version or record.input.shape != x.shape:
        return None
    return record


def _channel_view(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def _group_shape(x: torch.Tensor, per_pixel: bool) -> Tuple[int, int, int, int]:
    return (1, 1, x.shape[2], x.shape[3]) if per_pixel else (1, x.shape[1], 1, 1)


def affine(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a·x + b`` with ``a``, ``b`` of shape (1, C, 1, 1) (per channel) or (1, 1, H, W) (per pixel), in ``x``'s
    dtype. Per channel it is ATen's eval-mode batch norm with zero mean, unit variance and eps 0 (exact): one pass,
    about twice as fast on a CPU as the broadcasting ``addcmul`` used per pixel."""
    param_dtype = x.dtype if x.dtype == torch.float32 or x.dtype == torch.float64 else torch.float32
    if a.shape[1] == x.shape[1] and a.shape[2] == 1 and a.shape[3] == 1:
        a, b = a.reshape(-1).to(param_dtype), b.reshape(-1).to(param_dtype)
        return torch.nn.functional.batch_norm(x, torch.zeros_like(a), torch.ones_like(a), a, b, False, 0.0, 0.0)
    return torch.addcmul(b.to(x.dtype), x, a.to(x.dtype))


def _restore_input(saved: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> torch.Tensor:
    """The gate's input: saved as is, or recomputed from the preceding norm's input (``scale·y + shift``)."""
    if scale is None:
        return saved
    return affine(saved, _channel_view(scale), _channel_view(shift))


def _update_running_stats(running_mean, running_var, mean, var, n: int, factor: float) -> None:
    if running_mean is not None and running_var is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), factor)
        running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), factor)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the kernels compute in float32


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton imports (it ships with PyTorch's CUDA builds) and is not switched off with ``TIMM_NAM_TRITON=0``."""
    if os.environ.get('TIMM_NAM_TRITON', '1').strip().lower() in ('0', 'false', 'no'):
        return False
    return importlib.util.find_spec('triton') is not None


def _kernels_apply(x: torch.Tensor) -> bool:
    """Whether `timm_nam.layers.nam_triton` runs the gate on ``x``: a float32 / float16 / bfloat16 CUDA tensor (any
    device under Triton's interpreter, ``TRITON_INTERPRET=1``), Triton present, and deterministic algorithms not
    requested (the backward reduction accumulates with atomics). Triton is imported only when a kernel runs."""
    if not (x.is_cuda or os.environ.get('TRITON_INTERPRET') == '1') or x.dtype not in _KERNEL_DTYPES:
        return False
    return triton_available() and not torch.are_deterministic_algorithms_enabled()


class _GateFn(torch.autograd.Function):
    """``sigmoid(BN(x; weight, bias)) · x`` with batch statistics (per channel or per pixel), keeping one full-size
    tensor for backward: ``x``, or the input of the norm that produced ``x`` (``norm``), which that norm keeps
    anyway. ``mean``/``invstd`` are the batch statistics of ``x``; for a channel gate without them the forward
    computes them with ``torch.native_batch_norm`` (``bn_args``: running mean, running var, factor, eps)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, per_pixel: bool, norm: Optional[NormOutput], bn_args):
        shape = _group_shape(x, per_pixel)
        use_kernels = _kernels_apply(x)
        if mean is None:  # CPU channel gate: statistics and logits in one ATen call
            logits, mean, invstd = torch.native_batch_norm(x, weight, bias, *bn_args)
            out = logits.sigmoid_().mul_(x)
        else:
            a = weight * invstd
            b = bias - mean * a
            if use_kernels:
                from .nam_triton import folded_gate_cuda

                out = folded_gate_cuda(x, a.view(shape), b.view(shape))
            else:
                out = affine(x, a.view(shape), b.view(shape)).sigmoid_().mul_(x)
        if norm is None:
            ctx.save_for_backward(x, weight, bias, mean, invstd)
        else:
            ctx.save_for_backward(norm.input, weight, bias, mean, invstd, norm.scale, norm.shift)
        ctx.per_pixel, ctx.use_kernels = per_pixel, use_kernels
        return out

    @staticmethod
    @once_differentiable  # a second derivative raises a clear error instead of a wrong one
    def backward(ctx, grad):
        saved, weight, bias, mean, invstd, *pre = ctx.saved_tensors
        a = weight * invstd
        b = bias - mean * a
        if ctx.use_kernels:
            from .nam_triton import gate_backward_cuda

            grad_x, grad_weight, grad_bias = gate_backward_cuda(saved, grad, a, b, mean, invstd, ctx.per_pixel, *pre)
            grad_weight, grad_bias = grad_weight.reshape(weight.shape), grad_bias.reshape(bias.shape)
        else:
            x = _restore_input(saved, *pre) if pre else saved
            grad_x, grad_weight, grad_bias = _gate_backward(x, grad, weight, a, b, mean, invstd, ctx.per_pixel)
        return (
            grad_x.to(grad.dtype),
            grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _gate_backward(x, grad, weight, a, b, mean, invstd, per_pixel: bool):
    """PyTorch ops for `_GateFn.backward`: ``(∂x, ∂weight, ∂bias)``."""
    shape = _group_shape(x, per_pixel)
    s = affine(x, a.view(shape), b.view(shape)).sigmoid_()
    grad_logits = torch.ops.aten.sigmoid_backward(grad * x, s)  # grad·x·s·(1 - s)
    if not per_pixel:  # ATen's batch-norm backward over (N, H, W), plus the direct term grad·s
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_logits, x, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        return grad_x.addcmul_(s, grad), grad_weight, grad_bias
    # batch-norm backward over (N, C) for every pixel, in at least float32
    n = x.shape[0] * x.shape[1]
    acc = torch.promote_types(x.dtype, torch.float32)
    x_hat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
    grad_logits = grad_logits.to(acc)
    sum_g = grad_logits.sum((0, 1))
    sum_gx = (grad_logits * x_hat).sum((0, 1))
    grad_x = (grad_logits - sum_g / n).sub_(x_hat.mul_(sum_gx / n)).mul_(a.view(shape))
    return grad_x.to(x.dtype).addcmul_(s, grad), sum_gx.reshape(weight.shape), sum_g.reshape(weight.shape)


def channel_gate_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    factor: float,
    eps: float,
) -> torch.Tensor:
    """Training-mode channel gate ``sigmoid(BN(x; weight, bias)) · x`` (batch statistics; running statistics
    updated with ``factor``), memory-efficient. ``weight``/``bias`` are the gate's effective scale and shift
    (``w·γ``, ``w·β``): their gradients flow back through whatever computed them."""
    if x.numel() == x.shape[1]:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {list(x.shape)}')
    norm = published_norm_output(x)
    n = x.numel() // x.shape[1]
    mean = invstd = None
    with torch.no_grad():
        if norm is not None:  # statistics of x from the norm that produced it: no reduction over x
            mean, var = norm.mean, norm.var
        elif _kernels_apply(x):
            if x.is_cuda:  # one reduction pass, float32 accumulation for half inputs
                mean, invstd = torch.batch_norm_stats(x, eps)
                var = (invstd.square().reciprocal() - eps).clamp_(min=0)
            else:  # Triton's interpreter
                var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)
        if mean is not None:
            invstd = torch.rsqrt(var + eps)
            _update_running_stats(running_mean, running_var, mean, var, n, factor)
    return _GateFn.apply(x, weight, bias, mean, invstd, False, norm, (running_mean, running_var, True, factor, eps))


def pixel_gate_train(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """Training-mode pixel gate with the given per-pixel batch ``mean`` and biased ``var`` of ``x`` (float32,
    computed by the caller, who also updates the running statistics), memory-efficient."""
    invstd = torch.rsqrt(var.detach() + eps)
    return _GateFn.apply(x, weight, bias, mean.detach(), invstd, True, published_norm_output(x), None)


def fold_gate(
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode coefficients of ``w·BN(x) = a·x + b`` from the gate's effective scale/shift and running stats."""
    a = weight * torch.rsqrt(running_var + eps)
    return a, bias - running_mean * a


def _cuda_kernel_applies(x: torch.Tensor) -> bool:
    if not eager_fast_path(x) or (torch.is_grad_enabled() and x.requires_grad):
        return False
    return _kernels_apply(x)


def _folded_gate_cuda(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from .nam_triton import folded_gate_cuda

    return folded_gate_cuda(x, a, b)


@register_notrace_function  # FX records the call; its dispatch runs on real tensors
def folded_gate(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x · sigmoid(a·x + b)`` with ``a``, ``b`` of shape (1, C, 1, 1) or (1, 1, H, W). Eager CUDA inference runs
    it as one Triton kernel (one read, one write); everything else as three PyTorch ops."""
    if not torch.jit.is_scripting():
        if _cuda_kernel_applies(x):
            return _folded_gate_cuda(x, a, b)
    return nam_gate(x, affine(x, a, b))
