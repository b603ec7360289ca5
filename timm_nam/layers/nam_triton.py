"""Triton kernels for NAM's gate on CUDA tensors in eager mode.

In eager PyTorch the gate ``x · sigmoid(a·x + b)`` is three kernels (affine, sigmoid, product) that each read and
write the whole tensor, and its training backward is about nine. These kernels do the forward in one pass (read x,
write out) and the backward in two (a per-group reduction of ``Σ∂z`` and ``Σ∂z·x̂``, then one elementwise pass
that writes ``∂x``), recomputing ``x`` from the preceding norm's input where that norm published it.

Groups are channels (NAMChannel) or pixel positions (NAMSpatial); NCHW-contiguous and channels-last tensors are
indexed in place. Only imported when a CUDA tensor reaches the gate (``import timm`` never imports Triton).
Set ``TIMM_NAM_TRITON=0`` to use the PyTorch ops instead. ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors
(that is how the tests check them on machines without a GPU).
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

__all__ = ['folded_gate_cuda', 'gate_backward_cuda']


@triton.jit
def _indices(offs, C, HW, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        return offs % C, (offs // C) % HW
    return (offs // HW) % C, offs % HW


@triton.jit
def gate_fwd(
    x_ptr,
    a_ptr,
    b_ptr,
    out_ptr,
    numel,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c, p = _indices(offs, C, HW, CHANNELS_LAST)
    g = p if PER_PIXEL else c
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    a = tl.load(a_ptr + g, mask=mask)
    b = tl.load(b_ptr + g, mask=mask)
    out = x * tl.sigmoid(a * x + b)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_terms(
    src, grad, c, g, alpha_ptr, delta_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, mask, RECOMPUTE: tl.constexpr
):
    """x (recomputed from the norm's input if asked), x̂, the direct gradient g·s and ∂z."""
    x = src
    if RECOMPUTE:
        x = src * tl.load(alpha_ptr + c, mask=mask) + tl.load(delta_ptr + c, mask=mask)
    a = tl.load(a_ptr + g, mask=mask)
    s = tl.sigmoid(a * x + tl.load(b_ptr + g, mask=mask))
    x_hat = (x - tl.load(mean_ptr + g, mask=mask)) * tl.load(invstd_ptr + g, mask=mask)
    grad_z = grad * x * s * (1.0 - s)
    return a, x_hat, grad * s, grad_z


@triton.jit
def _tile(
    src_ptr,
    grad_ptr,
    alpha_ptr,
    delta_ptr,
    a_ptr,
    b_ptr,
    mean_ptr,
    invstd_ptr,
    r,
    k,
    R,
    K,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    RECOMPUTE: tl.constexpr,
):
    """∂z and ∂z·x̂ on the tile rows r × columns k of the (R, K) matrix view, zero outside it."""
    mask = (r[:, None] < R) & (k[None, :] < K)
    zero = (r[:, None] * 0 + k[None, :] * 0).to(tl.int64)
    if CHANNELS_LAST:  # rows n·HW + p, columns c
        c = zero + k[None, :]
        p = zero + r[:, None] % HW
    else:  # rows n·C + c, columns p
        c = zero + r[:, None] % C
        p = zero + k[None, :]
    g = p if PER_PIXEL else c
    offs = r[:, None] * K + k[None, :]
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, x_hat, _, grad_z = _grad_terms(
        src, grad, c, g, alpha_ptr, delta_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, mask, RECOMPUTE
    )
    grad_z = tl.where(mask, grad_z, 0.0)
    return grad_z, grad_z * x_hat


@triton.jit
def gate_bwd_reduce_rows(
    src_ptr,
    grad_ptr,
    alpha_ptr,
    delta_ptr,
    a_ptr,
    b_ptr,
    mean_ptr,
    invstd_ptr,
    sum_ptr,
    sum_xhat_ptr,
    R,
    K,
    C,
    HW,
    CHANNELS_LAST: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Groups are rows (channels of NCHW, pixels of channels-last): a program sums whole rows."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_xhat = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        gz, gzx = _tile(
            src_ptr,
            grad_ptr,
            alpha_ptr,
            delta_ptr,
            a_ptr,
            b_ptr,
            mean_ptr,
            invstd_ptr,
            r,
            k,
            R,
            K,
            C,
            HW,
            CHANNELS_LAST,
            PER_PIXEL,
            RECOMPUTE,
        )
        acc += tl.sum(gz, axis=1)
        acc_xhat += tl.sum(gzx, axis=1)
    group = r % HW if CHANNELS_LAST else r % C
    tl.atomic_add(sum_ptr + group, acc, mask=r < R)
    tl.atomic_add(sum_xhat_ptr + group, acc_xhat, mask=r < R)


@triton.jit
def gate_bwd_reduce_cols(
    src_ptr,
    grad_ptr,
    alpha_ptr,
    delta_ptr,
    a_ptr,
    b_ptr,
    mean_ptr,
    invstd_ptr,
    sum_ptr,
    sum_xhat_ptr,
    R,
    K,
    C,
    HW,
    ROWS_PER_PROG,
    CHANNELS_LAST: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Groups are columns (channels of channels-last, pixels of NCHW): a program sums a slab of rows of one
    column tile."""
    k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    row0 = tl.program_id(0).to(tl.int64) * ROWS_PER_PROG
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_xhat = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, ROWS_PER_PROG, BLOCK_R):
        r = row0 + r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r = tl.where(r < row0 + ROWS_PER_PROG, r, R)  # rows of the next slab count as outside
        gz, gzx = _tile(
            src_ptr,
            grad_ptr,
            alpha_ptr,
            delta_ptr,
            a_ptr,
            b_ptr,
            mean_ptr,
            invstd_ptr,
            r,
            k,
            R,
            K,
            C,
            HW,
            CHANNELS_LAST,
            PER_PIXEL,
            RECOMPUTE,
        )
        acc += tl.sum(gz, axis=0)
        acc_xhat += tl.sum(gzx, axis=0)
    tl.atomic_add(sum_ptr + k, acc, mask=k < K)
    tl.atomic_add(sum_xhat_ptr + k, acc_xhat, mask=k < K)


@triton.jit
def gate_bwd_dx(
    src_ptr,
    grad_ptr,
    alpha_ptr,
    delta_ptr,
    a_ptr,
    b_ptr,
    mean_ptr,
    invstd_ptr,
    sum_ptr,
    sum_xhat_ptr,
    dx_ptr,
    numel,
    C,
    HW,
    inv_n,
    CHANNELS_LAST: tl.constexpr,
    PER_PIXEL: tl.constexpr,
    RECOMPUTE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c, p = _indices(offs, C, HW, CHANNELS_LAST)
    g = p if PER_PIXEL else c
    src = tl.load(src_ptr + offs, mask=mask).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=mask).to(tl.float32)
    a, x_hat, grad_direct, grad_z = _grad_terms(
        src, grad, c, g, alpha_ptr, delta_ptr, a_ptr, b_ptr, mean_ptr, invstd_ptr, mask, RECOMPUTE
    )
    mean_gz = tl.load(sum_ptr + g, mask=mask) * inv_n
    mean_gz_xhat = tl.load(sum_xhat_ptr + g, mask=mask) * inv_n
    dx = grad_direct + a * (grad_z - mean_gz - x_hat * mean_gz_xhat)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _layout(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """``x`` as NCHW-contiguous or channels-last (copied to NCHW if it is neither), and which."""
    if x.is_contiguous():
        return x, False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x, True
    return x.contiguous(), False


def _group_vec(v: torch.Tensor) -> torch.Tensor:
    return v.detach().reshape(-1).float().contiguous()


def folded_gate_cuda(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x · sigmoid(a·x + b)`` in one kernel; ``a``, ``b`` of shape (1, C, 1, 1) or (1, 1, H, W). No autograd."""
    x, channels_last = _layout(x)
    n, c, h, w = x.shape
    per_pixel = not (a.shape[1] == c and a.shape[2] == a.shape[3] == 1)  # else (1, 1, H, W)
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        gate_fwd[(triton.cdiv(numel, _BLOCK),)](
            x,
            _group_vec(a),
            _group_vec(b),
            out,
            numel,
            c,
            h * w,
            CHANNELS_LAST=channels_last,
            PER_PIXEL=per_pixel,
            BLOCK=_BLOCK,
        )
    return out


def gate_backward_cuda(
    src: torch.Tensor,
    grad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    per_pixel: bool,
    pre_scale: Optional[torch.Tensor] = None,
    pre_shift: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of the training gate ``x · sigmoid(z)``, ``z = a·x + b`` being a batch norm of ``x`` with batch
    statistics ``mean``, ``invstd`` and effective scale ``a/invstd`` (per group): returns ``∂x`` and, per group,
    ``Σ∂z·x̂`` and ``Σ∂z`` (the gradients of the norm's effective scale and shift). ``src`` is ``x``, or the
    preceding norm's input with ``x = pre_scale·src + pre_shift`` per channel."""
    src, channels_last = _layout(src)
    grad = grad.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    n, c, h, w = src.shape
    hw = h * w
    groups = hw if per_pixel else c
    recompute = pre_scale is not None
    vecs = [_group_vec(v) for v in (a, b, mean, invstd)]
    alpha = _group_vec(pre_scale) if recompute else vecs[0]
    delta = _group_vec(pre_shift) if recompute else vecs[1]
    sums = torch.zeros(2, groups, device=src.device, dtype=torch.float32)
    rows, cols = (n * hw, c) if channels_last else (n * c, hw)
    args = (src, grad, alpha, delta, *vecs, sums[0], sums[1], rows, cols, c, hw)
    flags = dict(CHANNELS_LAST=channels_last, PER_PIXEL=per_pixel, RECOMPUTE=recompute)
    block_r, block_k = 32, 64
    if per_pixel == channels_last:  # groups are rows
        gate_bwd_reduce_rows[(triton.cdiv(rows, block_r),)](*args, **flags, BLOCK_R=block_r, BLOCK_K=block_k)
    else:  # groups are columns: about 256 row slabs per column tile
        rows_per_prog = max(1, triton.cdiv(rows, 256 * block_r)) * block_r
        grid = (triton.cdiv(rows, rows_per_prog), triton.cdiv(cols, block_k))
        gate_bwd_reduce_cols[grid](*args, rows_per_prog, **flags, BLOCK_R=block_r, BLOCK_K=block_k)
    dx = torch.empty(
        src.shape,
        device=src.device,
        dtype=grad.dtype,
        memory_format=torch.channels_last if channels_last else torch.contiguous_format,
    )
    numel = src.numel()
    gate_bwd_dx[(triton.cdiv(numel, _BLOCK),)](
        src,
        grad,
        alpha,
        delta,
        *vecs,
        sums[0],
        sums[1],
        dx,
        numel,
        c,
        hw,
        1.0 / (numel // groups),
        CHANNELS_LAST=channels_last,
        PER_PIXEL=per_pixel,
        RECOMPUTE=recompute,
        BLOCK=_BLOCK,
    )
    return dx, sums[1], sums[0]
