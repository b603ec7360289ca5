"""The Triton kernels of NAM's gate against the PyTorch ops they replace: the folded gate, and the training gate's
forward and backward (per channel and per pixel, NCHW and channels-last, after a NAM-aware norm and alone).

They run on a CUDA device, or on the CPU under Triton's interpreter: ``TRITON_INTERPRET=1`` (set before Triton
compiles anything; `tests/test_fast_paths.py` runs this file that way in a subprocess)."""

import os

import pytest
import torch

from timm_nam.layers import BatchNorm2dForNAM
from timm_nam.layers.nam import pixel_batch_stats
from timm_nam.layers.nam_functional import _kernels_apply, channel_gate_train, folded_gate, pixel_gate_train

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
DEVICE = 'cuda' if torch.cuda.is_available() and not INTERPRET else 'cpu'
pytestmark = pytest.mark.skipif(
    not (INTERPRET or torch.cuda.is_available()), reason='needs a CUDA device or TRITON_INTERPRET=1'
)


def _stock(fn):
    """``fn()`` with the kernels switched off (the PyTorch-ops path)."""
    if INTERPRET:
        os.environ['TRITON_INTERPRET'] = '0'
    else:
        os.environ['TIMM_NAM_TRITON'] = '0'
        from timm_nam.layers.nam_functional import triton_available

        triton_available.cache_clear()
    try:
        return fn()
    finally:
        os.environ.pop('TIMM_NAM_TRITON', None)
        if INTERPRET:
            os.environ['TRITON_INTERPRET'] = '1'
        else:
            from timm_nam.layers.nam_functional import triton_available

            triton_available.cache_clear()


def _input(dtype, channels_last, shape=(3, 6, 5, 4)):
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.5).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('per_pixel', [False, True], ids=['channel', 'pixel'])
def test_folded_gate_kernel(dtype, channels_last, per_pixel):
    x = _input(dtype, channels_last)
    shape = (1, 1, 5, 4) if per_pixel else (1, 6, 1, 1)
    a, b = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    assert _kernels_apply(x)
    out = folded_gate(x, a, b)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    expected = x.float() * torch.sigmoid(a * x.float() + b)
    torch.testing.assert_close(out.float(), expected, **TOL[dtype])


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('channels_last', [False, True], ids=['nchw', 'channels_last'])
@pytest.mark.parametrize('per_pixel', [False, True], ids=['channel', 'pixel'])
@pytest.mark.parametrize('after_norm', [False, True], ids=['alone', 'after_nam_aware_bn'])
@pytest.mark.parametrize('shape', [(3, 6, 5, 4), (2, 5, 9, 9)], ids=['small', 'rows_longer_than_a_tile'])
def test_training_gate_kernels(dtype, channels_last, per_pixel, after_norm, shape):
    """Output and every gradient against the PyTorch-ops path in float64 (the kernels accumulate in float32)."""
    torch.manual_seed(0)
    groups = shape[2] * shape[3] if per_pixel else shape[1]
    y0, grad0 = torch.randn(shape, device=DEVICE) * 2 + 0.5, torch.randn(shape, device=DEVICE)
    weight0, bias0 = torch.randn(groups, device=DEVICE), torch.randn(groups, device=DEVICE)

    def run(dtype):
        param_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        y = y0.to(dtype)
        y = (y.contiguous(memory_format=torch.channels_last) if channels_last else y).requires_grad_()
        weight, bias = (v.to(param_dtype).requires_grad_() for v in (weight0, bias0))
        norm = BatchNorm2dForNAM(shape[1], device=DEVICE, dtype=param_dtype)
        x = norm(y) if after_norm else y
        assert _kernels_apply(x) == (dtype != torch.float64 and os.environ.get('TRITON_INTERPRET') != '0')
        if per_pixel:
            with torch.no_grad():
                mean, var, _ = pixel_batch_stats(x)
            out = pixel_gate_train(x, weight, bias, mean, var, 1e-5)
        else:
            out = channel_gate_train(x, weight, bias, None, None, 0.1, 1e-5)
        params = [y, weight, bias, *(norm.parameters() if after_norm else ())]
        return (out, *torch.autograd.grad(out, params, grad0.to(dtype)))

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, expected in zip(run(dtype), _stock(lambda: run(torch.float64))):
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.double(), expected, atol=tol * max(scale, 1.0), rtol=0)
