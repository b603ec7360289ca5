"""NAM's fast paths change nothing a user can observe but cost: the memory-efficient training gate (outputs, every
gradient, running statistics, what it keeps for backward), the NAM-aware norms before it, and the folded inference
gate (`fuse()` / `timm.utils.reparameterize_model`)."""

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import set_layer_config
from timm.utils import reparameterize_model

from tests.helpers import channel_reference, randomize_bn
from timm_nam import NAM, NAMChannel, NAMGate, NAMSpatial
from timm_nam.layers import BatchNorm2dForNAM
from timm_nam.layers.nam import pixel_batch_stats
from timm_nam.layers.nam_functional import channel_gate_train, pixel_gate_train, published_norm_output


def _nam_aware_bn(channels: int) -> nn.BatchNorm2d:
    bn = BatchNorm2dForNAM(channels).double()
    randomize_bn(bn)
    return bn


def _plain_copy(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    plain = nn.BatchNorm2d(bn.num_features).double()
    plain.load_state_dict(bn.state_dict())
    return plain


def _reference(layer: nn.Module, x: torch.Tensor, through: bool, weighting: str = 'sum') -> torch.Tensor:
    """The authors' formula on a copy of ``layer``'s BN, weights (written out) optionally with gradient."""
    bn = layer.bn
    scale = bn.weight if through else bn.weight.detach()
    w = scale.abs() / (scale.abs().sum() if weighting == 'sum' else scale.abs().mean())
    if isinstance(layer, NAMChannel):
        y = bn(x)
        w = w.view(1, -1, 1, 1)
    else:
        n, c, h, w_ = x.shape
        y = bn(x.permute(0, 2, 3, 1).reshape(n, h * w_, c)).reshape(n, h, w_, c).permute(0, 3, 1, 2)
        w = w.view(1, 1, h, w_)
    return torch.sigmoid(y * w) * x


@pytest.mark.parametrize('kind', ['channel', 'pixel'])
@pytest.mark.parametrize('after_norm', [False, True], ids=['alone', 'after_nam_aware_bn'])
@pytest.mark.parametrize('through', [False, True], ids=['weights_const', 'grad_through_weights'])
@pytest.mark.parametrize('weighting', ['sum', 'mean'])
def test_training_path_equals_formula_float64(kind, after_norm, through, weighting):
    """Outputs, the gradients of the input, of γ and β (and of the preceding BN) and the running statistics
    of three training steps equal the authors' formula on plain modules."""
    layer = (NAMChannel(6) if kind == 'channel' else NAMSpatial(6, feat_size=(4, 5))).double()
    layer.weighting = weighting
    layer.grad_through_weights = through
    randomize_bn(layer.bn)
    ref = copy.deepcopy(layer)
    if kind == 'pixel':  # the authors' BatchNorm1d(H·W), with the same state
        ref.bn = nn.BatchNorm1d(20).double()
        ref.bn.load_state_dict(layer.bn.state_dict())
    pre = _nam_aware_bn(6) if after_norm else nn.Identity()
    ref_pre = _plain_copy(pre) if after_norm else nn.Identity()
    for step in range(3):
        y = (torch.randn(3, 6, 4, 5, dtype=torch.float64) * 2 + step).requires_grad_()
        x = pre(y)
        assert (published_norm_output(x) is not None) == after_norm
        out, ref_out = layer(x), _reference(ref, ref_pre(y), through, weighting)
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
        grad = torch.randn_like(out)
        params = [layer.bn.weight, layer.bn.bias, *pre.parameters()]
        ref_params = [ref.bn.weight, ref.bn.bias, *ref_pre.parameters()]
        got = torch.autograd.grad(out, [y, *params], grad)
        expected = torch.autograd.grad(ref_out, [y, *ref_params], grad)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    for a, b in zip(layer.bn.buffers(), ref.bn.buffers()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    for a, b in zip(pre.buffers(), ref_pre.buffers()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize('after_norm', [False, True], ids=['alone', 'after_nam_aware_bn'])
def test_gate_functions_pass_gradcheck(after_norm):
    torch.manual_seed(0)
    pre = _nam_aware_bn(3) if after_norm else nn.Identity()
    y = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    pixel_weight = torch.randn(6, dtype=torch.float64, requires_grad=True)
    pixel_bias = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def channel(y, w, b, *pre_params):
        return channel_gate_train(pre(y), w, b, None, None, 0.1, 1e-5)

    def pixel(y, w, b, *pre_params):
        x = pre(y)
        with torch.no_grad():
            mean, var, _ = pixel_batch_stats(x)
        return pixel_gate_train(x, w, b, mean, var, 1e-5)

    assert torch.autograd.gradcheck(channel, (y, weight, bias, *pre.parameters()))
    assert torch.autograd.gradcheck(pixel, (y, pixel_weight, pixel_bias, *pre.parameters()))


def _saved_full_size(fn, numel: int) -> int:
    """How many distinct tensors of ``numel`` elements autograd keeps for the backward of ``fn()``."""
    saved = set()

    def pack(t):
        if t.numel() == numel:
            saved.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return len(saved)


@pytest.mark.parametrize('make', [lambda: NAMChannel(8), lambda: NAMSpatial(8, feat_size=5)])
def test_training_gate_keeps_one_tensor_and_none_after_a_nam_aware_norm(make):
    layer = make()
    y = torch.randn(4, 8, 5, 5, requires_grad=True)
    assert _saved_full_size(lambda: layer(y), y.numel()) == 1  # its input
    bn = BatchNorm2dForNAM(8)
    assert _saved_full_size(lambda: bn(y), y.numel()) == 1  # the norm keeps its input
    assert _saved_full_size(lambda: layer(bn(y)), y.numel()) == 1  # ... and the gate keeps nothing more
    plain = nn.BatchNorm2d(8)
    assert _saved_full_size(lambda: layer(plain(y)), y.numel()) == 2


def test_second_derivatives_take_timms_exportable_switch():
    """The memory-efficient gate is once differentiable (a clear error, not a wrong number); timm's
    ``set_layer_config(exportable=True)`` selects the reference formula, which autograd differentiates twice."""
    layer = NAMChannel(4).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()
    with set_layer_config(exportable=True):
        (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    assert grad.requires_grad
    (second,) = torch.autograd.grad(grad.sum(), x)
    ref_bn = copy.deepcopy(layer.bn)
    xr = x.detach().requires_grad_()
    (ref_grad,) = torch.autograd.grad(channel_reference(ref_bn, xr).square().sum(), xr, create_graph=True)
    torch.testing.assert_close(second, torch.autograd.grad(ref_grad.sum(), xr)[0])


def test_in_place_change_after_the_norm_falls_back_exactly():
    bn, layer = _nam_aware_bn(4), NAMChannel(4).double()
    ref_bn, ref = _plain_copy(bn), copy.deepcopy(layer)
    y = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    x = bn(y)
    x.mul_(2)  # the record no longer describes x
    assert published_norm_output(x) is None
    torch.testing.assert_close(layer(x), channel_reference(ref.bn, ref_bn(y) * 2), atol=1e-12, rtol=0)


def test_norm_publishes_only_in_eager_training():
    bn = BatchNorm2dForNAM(4)
    y = torch.randn(2, 4, 3, 3)
    assert published_norm_output(bn(y)) is not None
    with torch.no_grad():  # the same numbers with and without autograd (reentrant checkpoints rely on it)
        assert published_norm_output(bn(y)) is not None
    assert published_norm_output(bn.eval()(y)) is None
    with set_layer_config(exportable=True):
        assert published_norm_output(bn.train()(y)) is None


@pytest.mark.parametrize('momentum', [0.1, None])
def test_nam_aware_norm_equals_batchnorm(momentum):
    bn = BatchNorm2dForNAM(5, momentum=momentum)
    randomize_bn(bn)
    ref = nn.BatchNorm2d(5, momentum=momentum)
    ref.load_state_dict(bn.state_dict())
    for _ in range(3):
        y = torch.randn(4, 5, 3, 3, requires_grad=True)
        out, ref_out = bn(y), ref(y)
        torch.testing.assert_close(out, ref_out)
        g = torch.randn_like(out)
        for a, b in zip(
            torch.autograd.grad(out, [y, bn.weight, bn.bias], g),
            torch.autograd.grad(ref_out, [y, ref.weight, ref.bias], g),
        ):
            torch.testing.assert_close(a, b)
    for a, b in zip(bn.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        bn(torch.randn(1, 5, 1, 1))


def test_models_use_nam_aware_norms_with_unchanged_keys():
    model = timm.create_model('resnet50_nam')
    plain = timm.create_model('resnet50', block_args=dict(attn_layer=NAMChannel))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(type(b.bn3) is BatchNorm2dForNAM for s in (model.layer1, model.layer4) for b in s)
    assert type(model.layer1[0].bn1) is nn.BatchNorm2d  # only the norms that feed a gate
    mbv2, plain = (
        set(timm.create_model('mobilenetv2_100_nam').state_dict()),
        set(timm.create_model('mobilenetv2_100').state_dict()),
    )
    assert plain < mbv2 and all('.act.bn.' in k for k in mbv2 - plain)  # timm's keys plus the gates' own


@pytest.mark.parametrize(
    'name,base',
    [
        ('resnet18_nam', 'resnet18'),
        ('mobilenetv2_100_nam', 'mobilenetv2_100'),
        ('efficientnet_b0_nam', 'efficientnet_b0'),
    ],
)
def test_model_training_keeps_the_activations_of_the_plain_model(name, base):
    """NAM after every block adds per-channel vectors only to what a training step keeps for backward."""

    def saved_bytes(model):
        saved = {}

        def pack(t):
            saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        x = torch.randn(2, 3, 64, 64)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(saved.values())

    nam, plain = saved_bytes(timm.create_model(name).train()), saved_bytes(timm.create_model(base).train())
    assert nam <= 1.01 * plain, (nam, plain)


@pytest.mark.parametrize('name', ['resnet18_nam', 'mobilenetv2_100_nam'])
@pytest.mark.parametrize('reentrant', [False, True])
def test_training_with_grad_checkpointing_gives_the_same_gradients(name, reentrant):
    """Checkpointed blocks are recomputed in backward (timm's set_grad_checkpointing; the reentrant variant runs the
    first forward without grad): the gate must give the same numbers in every run."""
    model = timm.create_model(name, num_classes=5).train()
    checkpointed = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    model(x).square().sum().backward()
    blocks = (
        [b for s in (checkpointed.layer1, checkpointed.layer2, checkpointed.layer3, checkpointed.layer4) for b in s]
        if hasattr(checkpointed, 'layer1')
        else [b for s in checkpointed.blocks for b in s]
    )
    for block in blocks:
        block.forward = functools.partial(torch.utils.checkpoint.checkpoint, block.forward, use_reentrant=reentrant)
    checkpointed(x).square().sum().backward()
    for (n, a), b in zip(model.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_triton_kernels_under_the_interpreter():
    """The CUDA kernels, checked on this machine's CPU by Triton's interpreter (tests/test_triton_kernels.py)."""
    pytest.importorskip('triton')
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [
            sys.executable,
            '-m',
            'pytest',
            '-q',
            '-p',
            'no:cacheprovider',
            str(root / 'tests' / 'test_triton_kernels.py'),
        ],
        cwd=root,
        env=dict(os.environ, TRITON_INTERPRET='1'),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ' passed' in result.stdout and 'skipped' not in result.stdout


# ---- inference folding ----


@pytest.mark.parametrize(
    'make', [lambda: NAMChannel(6), lambda: NAMSpatial(6, feat_size=(4, 5)), lambda: NAM(6, feat_size=(4, 5))]
)
def test_fuse_equals_eval_float64(make):
    layer = make().double()
    for m in layer.modules():
        if isinstance(m, (NAMChannel, NAMSpatial)):
            randomize_bn(m.bn)
    layer.eval()
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64) * 3
    folded = layer.fuse()
    assert not any(isinstance(m, (NAMChannel, NAMSpatial)) for m in folded.modules())
    torch.testing.assert_close(folded(x), layer(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize('make', [lambda: NAMChannel(8), lambda: NAMSpatial(8, feat_size=5)])
def test_fused_low_precision_close_to_float64_formula(make, dtype, tol):
    layer = make()
    randomize_bn(layer.bn)
    ref = copy.deepcopy(layer).double().eval()
    x = torch.randn(4, 8, 5, 5)
    out = layer.eval().fuse()(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref(x.double()), atol=tol, rtol=tol)


def test_fused_gate_checks_its_input():
    gate = NAMSpatial(8, feat_size=5).eval().fuse()
    with pytest.raises(ValueError, match='built for 5x5 feature maps, got 6x6'):
        gate(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match='built for 8 channels, got input with 4'):
        NAMChannel(8).fuse()(torch.randn(1, 4, 3, 3))


@pytest.mark.parametrize(
    'name',
    ['resnet18_nam', 'resnet18_nam_sp', 'mobilenetv2_100_nam', 'mobilenetv2_050_nam_chsp', 'efficientnet_b0_nam'],
)
def test_reparameterize_model_folds_every_gate(name):
    model = timm.create_model(name, num_classes=7)
    for m in model.modules():
        if isinstance(m, (NAMChannel, NAMSpatial)):
            randomize_bn(m.bn)
    model.eval()
    size = timm.get_pretrained_cfg_value(name, 'input_size') if 'sp' in name else (3, 64, 64)
    x = torch.randn(2, *size)
    expected = model(x)
    fused = reparameterize_model(model)
    assert not any(isinstance(m, (NAMChannel, NAMSpatial, NAM)) for m in fused.modules())
    assert any(isinstance(m, NAMGate) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    model.reparameterize()  # the model's own method: in place
    assert not any(isinstance(m, NAMChannel) for m in model.modules())
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_unfused_state_dict_loads_then_folds():
    trained = timm.create_model('resnet18_nam', num_classes=5)
    for m in trained.modules():
        if isinstance(m, NAMChannel):
            randomize_bn(m.bn)
    state = trained.state_dict()
    fresh = timm.create_model('resnet18_nam', num_classes=5)
    fresh.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    folded = reparameterize_model(fresh.eval())
    torch.testing.assert_close(folded(x), trained.eval()(x), atol=1e-5, rtol=1e-5)
    # a folded model saves and loads as a folded model
    again = reparameterize_model(timm.create_model('resnet18_nam', num_classes=5).eval())
    again.load_state_dict(folded.state_dict())
    torch.testing.assert_close(again(x), folded(x))


def test_folded_model_scripts_and_compiles():
    model = reparameterize_model(timm.create_model('resnet18_nam', num_classes=5).eval())
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    torch.testing.assert_close(torch.jit.script(model)(x), expected)
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), expected)
