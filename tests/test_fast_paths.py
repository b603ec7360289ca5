"""NAM's fast paths change nothing a user can observe but cost: the memory-efficient training form of a norm and its
gate (outputs, every gradient, running statistics, what it keeps for backward) and the folded inference gate
(`fuse()` / `timm.utils.reparameterize_model`)."""

import copy
import functools

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, set_layer_config
from timm.utils import reparameterize_model

from tests.helpers import randomize_bn
from timm_nam import NAMChannel, NAMChannelSpatial, NAMGate, NAMSpatial
from timm_nam.layers import NormNAM, NormNAMMe, norm_nam
from timm_nam.models import nam_sites


def _norm_and_gate(norm_cls=nn.BatchNorm2d, channels=6, momentum=0.1, weighting='sum', through=False):
    """A memory-efficient norm + gate in float64 with random states, and a plain `NormNAM` copy of it."""
    extra = dict(apply_act=False) if norm_cls is BatchNormAct2d else {}  # a linear norm, as ends a residual branch
    norm = norm_cls(channels, momentum=momentum, **extra).double()
    gate = NAMChannel(channels, weighting=weighting, grad_through_weights=through, momentum=momentum).double()
    randomize_bn(norm)
    randomize_bn(gate.bn)
    fused = norm_nam(norm, gate)
    assert type(fused) is NormNAMMe
    return fused, NormNAM(*copy.deepcopy([norm, gate]))


@pytest.mark.parametrize('norm_cls', [nn.BatchNorm2d, BatchNormAct2d])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('through', [False, True], ids=['weights_const', 'grad_through_weights'])
@pytest.mark.parametrize('weighting', ['sum', 'mean'])
def test_memory_efficient_form_equals_the_formula_float64(norm_cls, momentum, through, weighting):
    """Outputs, the gradients of the input and of both norms' scales and shifts, and both norms' running statistics
    over three training steps equal the norm followed by the authors' formula."""
    fused, ref = _norm_and_gate(norm_cls, momentum=momentum, weighting=weighting, through=through)
    for step in range(3):
        y = (torch.randn(3, 6, 4, 5, dtype=torch.float64) * 2 + step).requires_grad_()
        out, ref_out = fused(y), ref(y)
        torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
        grad = torch.randn_like(out)
        got = torch.autograd.grad(out, [y, *fused.parameters()], grad)
        expected = torch.autograd.grad(ref_out, [y, *ref.parameters()], grad)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    for (name, a), b in zip(fused.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def test_memory_efficient_form_passes_gradcheck():
    # with the gradient through the weighting: gradcheck's finite differences see the weighting move with γ
    fused, _ = _norm_and_gate(channels=3, through=True)
    y = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, *params: fused(y), (y, *fused.parameters()))


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


def test_training_keeps_only_the_norms_input():
    """A plain batch norm keeps its input; the memory-efficient norm + gate keeps that and nothing else full-size,
    where the formula also keeps the gate's input and its sigmoid."""
    fused, ref = _norm_and_gate(channels=8)
    y = torch.randn(4, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    assert _saved_full_size(lambda: fused.norm(y), y.numel()) == 1
    assert _saved_full_size(lambda: fused(y), y.numel()) == 1
    assert _saved_full_size(lambda: ref(y), y.numel()) == 3


def test_the_memory_efficient_form_is_chosen_once_at_creation():
    """As timm's _me activations: unless timm's layer config asks for scriptable or exportable layers, and only where
    it applies (a channel gate after a plain batch norm); norms replaced later (frozen, synced) run as they are."""
    assert type(norm_nam(nn.BatchNorm2d(4), NAMChannel(4))) is NormNAMMe
    for config in (dict(scriptable=True), dict(exportable=True)):
        with set_layer_config(**config):
            assert type(norm_nam(nn.BatchNorm2d(4), NAMChannel(4))) is NormNAM
    assert type(norm_nam(nn.BatchNorm2d(4), NAMSpatial(4, feat_size=3))) is NormNAM
    assert type(norm_nam(BatchNormAct2d(4, act_layer=nn.ReLU), NAMChannel(4))) is NormNAM
    with set_layer_config(exportable=True):
        model = timm.create_model('resnet18_nam')
    assert not any(isinstance(m, NormNAMMe) for m in model.modules())
    assert all(type(m) is NormNAMMe for m in timm.create_model('resnet18_nam').modules() if isinstance(m, NormNAM))


def test_second_derivatives_take_timms_exportable_switch():
    """The memory-efficient form is once differentiable (a clear error, not a wrong number); timm's
    ``set_layer_config(exportable=True)`` builds the reference formula, which autograd differentiates twice."""
    fused, ref = _norm_and_gate(channels=4)
    y = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(fused(y).square().sum(), y, create_graph=True)
    with pytest.raises(RuntimeError, match='differentiate twice'):
        grad.sum().backward()
    with set_layer_config(exportable=True):
        plain = norm_nam(*copy.deepcopy([ref.norm, ref.nam]))
    (grad,) = torch.autograd.grad(plain(y).square().sum(), y, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), y)
    (ref_grad,) = torch.autograd.grad(ref(y).square().sum(), y, create_graph=True)
    torch.testing.assert_close(second, torch.autograd.grad(ref_grad.sum(), y)[0])


def test_models_hold_each_gate_with_the_norm_it_follows():
    """A NAM model's state dict is its plain network's with each gated norm's keys under ``.norm.`` and the gate's own
    batch norm beside them under ``.nam.bn.``; the gated norms are the last norm of every block."""
    bn_keys = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    for name, base, count in [('resnet50_nam', 'resnet50', 16), ('mobilenetv2_100_nam', 'mobilenetv2_100', 17)]:
        plain = timm.create_model(base)
        sites = nam_sites(plain, blocks_without_skip=True)  # every block, as the paper counts MobileNetV2's
        assert len(sites) == count and all(s.endswith(('.bn3', '.bn2')) for s in sites)
        moved = {f'{s}.{k}': f'{s}.norm.{k}' for s in sites for k in bn_keys}
        expected = {moved.get(k, k) for k in plain.state_dict()} | {f'{s}.nam.bn.{k}' for s in sites for k in bn_keys}
        assert set(timm.create_model(name).state_dict()) == expected
    model = timm.create_model('resnet50_nam')
    blocks = [*model.layer1, *model.layer4]
    assert all(type(b.bn3) is NormNAMMe and type(b.bn1) is nn.BatchNorm2d for b in blocks)


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


# ---- inference folding ----


@pytest.mark.parametrize(
    'make',
    [lambda: NAMChannel(6), lambda: NAMSpatial(6, feat_size=(4, 5)), lambda: NAMChannelSpatial(6, feat_size=(4, 5))],
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
    assert not any(isinstance(m, (NAMChannel, NAMSpatial, NAMChannelSpatial)) for m in fused.modules())
    assert any(isinstance(m, NAMGate) for m in fused.modules())
    torch.testing.assert_close(fused(x), expected, atol=1e-5, rtol=1e-5)
    reparameterize_model(model, inplace=True)
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
