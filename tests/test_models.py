"""Every registered timm-nam model against the checks of timm's own tests/test_models.py, plus the
paper's parameter counts and the placement of NAM."""

import copy
import math
import weakref

import pytest
import timm
import torch
from timm.models import get_pretrained_cfg_value, save_for_hf

import timm_nam  # noqa: F401  registers the models also when TIMM_DISABLE_PLUGINS is set
from tests.helpers import PAPER_PARAMS, placement_errors
from timm_nam import NAMChannel, NAMChannelSpatial, NAMSpatial
from timm_nam.layers import NormNAM
from timm_nam.models import MODEL_MODULES

ALL_MODELS = sorted(timm.list_models(module=list(MODEL_MODULES)))
# the big ones are covered by their smaller siblings in the slow-path tests below
BIG = ('resnet101_nam', 'mobilenetv2_140_nam', 'mobilenetv2_140_nam_chsp', 'regnety_016_nam')
FAST_MODELS = [m for m in ALL_MODELS if m not in BIG]

# sizes as timm's test suite picks them, smaller where the model allows it (2-core CPU)
TARGET_FWD, TARGET_BWD, TARGET_JIT, TARGET_FEAT = 160, 96, 96, 96


def _input_size(name, target):
    input_size = get_pretrained_cfg_value(name, 'input_size')
    if get_pretrained_cfg_value(name, 'fixed_input_size'):
        return input_size
    return tuple(min(s, target) for s in input_size)


def test_model_list():
    """Every model file of timm_nam.models registers through timm; the paper's models and the documented ones are
    among them."""
    documented = {'resnet18_nam', 'resnet50_nam', 'resnet50_nam_chsp', 'mobilenetv2_nam', 'efficientnet_lite0_nam'}
    documented |= {'regnety_008_nam', 'resnet18_half', 'resnet18_simam'}
    assert set(PAPER_PARAMS) - {'mobilenetv2_100'} | documented <= set(ALL_MODELS)
    assert set(timm.list_models('*nam*')) >= {m for m in ALL_MODELS if 'nam' in m}
    assert {timm.models.get_arch_name(m) for m in ALL_MODELS} == set(ALL_MODELS)


@pytest.mark.parametrize('name', sorted(PAPER_PARAMS))
def test_paper_parameter_counts(name):
    model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PAPER_PARAMS[name]


def _gate(block, norm):
    site = getattr(block, norm)
    assert isinstance(site, NormNAM) and block.se is None  # timm's attention slot stays empty
    return site.nam


def test_nam_placement_resnet():
    """After the last norm of every block (bn3 / bn2), before drop-path and the residual add."""
    model = timm.create_model('resnet50_nam')
    blocks = [b for s in (model.layer1, model.layer2, model.layer3, model.layer4) for b in s]
    gates = [_gate(b, 'bn3') for b in blocks]
    assert len(gates) == 16 and all(
        isinstance(g, NAMChannel) and g.channels == b.conv3.out_channels for g, b in zip(gates, blocks)
    )
    basic = timm.create_model('resnet18_nam')
    assert all(isinstance(_gate(b, 'bn2'), NAMChannel) for s in (basic.layer1, basic.layer4) for b in s)
    sp = timm.create_model('resnet50_nam_chsp')
    sizes = [_gate(b, 'bn3').spatial.feat_size for s in (sp.layer1, sp.layer2, sp.layer3, sp.layer4) for b in s]
    assert sizes == [(56, 56)] * 3 + [(28, 28)] * 4 + [(14, 14)] * 6 + [(7, 7)] * 3
    cifar = timm.create_model('resnet50_cifar_nam_sp')
    assert [_gate(s[0], 'bn3').feat_size for s in (cifar.layer1, cifar.layer2, cifar.layer3, cifar.layer4)] == [
        (32, 32),
        (16, 16),
        (8, 8),
        (4, 4),
    ]
    # numerically: the gate sees bn2's output and feeds the residual add
    block = basic.layer1[1].eval()
    x = torch.randn(1, 64, 16, 16)
    with torch.no_grad():
        branch = block.bn2.norm(block.conv2(block.act1(block.bn1(block.conv1(x)))))
        torch.testing.assert_close(block(x), torch.relu(block.bn2.nam(branch) + x))


@pytest.mark.parametrize('name', [m for m in FAST_MODELS if '_nam' in m and 'chsp' not in m and '_sp' not in m])
def test_every_gate_of_a_registered_model_sits_at_a_block_end(name):
    """Every gate ends a residual block's branch, or an inverted-residual block without a skip (the paper's count),
    and no such block is left without a gate, as timm's block modules say (`placement_errors`)."""
    assert placement_errors(timm.create_model(name), blocks_without_skip=True) == ([], [])


def test_nam_placement_mobilenetv2_is_after_projection_bn():
    model = timm.create_model('mobilenetv2_100_nam_chsp').eval()
    blocks = [b for s in model.blocks for b in s]
    assert len(blocks) == 17
    sites = [b.bn3 if hasattr(b, 'bn3') else b.bn2 for b in blocks]
    assert all(isinstance(s, NormNAM) and isinstance(s.nam, NAMChannelSpatial) for s in sites)
    assert [s.nam.spatial.feat_size[0] for s in sites] == [112] + [56] * 2 + [28] * 3 + [14] * 7 + [7] * 4
    # the gate sees the projection norm's output and feeds the residual add: check one block numerically
    block = model.blocks[1][1]  # an inverted residual with a shortcut (24 channels, 56x56)
    x = torch.randn(1, 24, 56, 56)
    with torch.no_grad():
        proj = block.bn3.norm(block.conv_pwl(block.bn2(block.conv_dw(block.bn1(block.conv_pw(x))))))
        torch.testing.assert_close(block(x), block.bn3.nam(proj) + x)


def test_spatial_models_raise_on_other_sizes_and_rebuild_with_img_size():
    model = timm.create_model('resnet50_cifar_nam_sp').eval()
    assert model.pretrained_cfg['fixed_input_size'] is True
    with pytest.raises(ValueError, match='built for 32x32 feature maps, got 48x48'):
        model(torch.randn(1, 3, 48, 48))
    model48 = timm.create_model('resnet50_cifar_nam_sp', img_size=48).eval()
    assert model48(torch.randn(1, 3, 48, 48)).shape == (1, 100)
    assert model48.pretrained_cfg['input_size'] == (3, 48, 48)
    assert model48.pretrained_cfg['pool_size'] == (6, 6)
    for name, img_size in (('mobilenetv2_050_nam_chsp', (97, 130)), ('resnet18_nam_sp', (200, 200))):
        model = timm.create_model(name, img_size=img_size).eval()
        features = model.forward_features(torch.randn(1, 3, *img_size))
        assert model(torch.randn(1, 3, *img_size)).shape == (1, 1000)
        # the cfg states the feature map the model produces at that size (data configs and timm's tests read it)
        assert model.pretrained_cfg['input_size'] == (3, *img_size)
        assert model.pretrained_cfg['pool_size'] == tuple(features.shape[-2:])
    for name in ('resnet50_nam', 'mobilenetv2_nam', 'mobilenetv2_050_nam', 'efficientnet_b0_nam', 'resnet50_cifar_nam'):
        assert get_pretrained_cfg_value(name, 'fixed_input_size') is False
        model = timm.create_model(name).eval()
        assert torch.isfinite(model(torch.randn(1, 3, 72, 56))).all()


@pytest.mark.parametrize('name', ALL_MODELS)
def test_pretrained_cfg_complete(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    for key in (
        'num_classes',
        'input_size',
        'pool_size',
        'mean',
        'std',
        'first_conv',
        'classifier',
        'license',
        'paper_ids',
        'origin_url',
        'crop_pct',
        'interpolation',
    ):
        assert cfg.get(key) is not None, f'{name}: cfg lacks {key}'
    spatial = any(isinstance(m, NAMSpatial) for m in timm.create_model(name).modules())
    assert cfg['fixed_input_size'] == spatial


@pytest.mark.parametrize('name', FAST_MODELS)
def test_model_forward_and_grad_checkpointing(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(name, TARGET_FWD))
    out = model(x)
    assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()

    # training: checkpointed stages are run again in backward and give the same gradients
    torch.manual_seed(0)
    plain = timm.create_model(name, num_classes=5).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    convs = [m for m in checkpointed.modules() if isinstance(m, torch.nn.Conv2d)]
    calls = []
    for conv in convs:
        conv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, *_input_size(name, TARGET_BWD))
    out = checkpointed(x)
    forward_calls = len(calls)
    out.sum().backward()
    assert len(calls) > forward_calls, 'set_grad_checkpointing() recomputed nothing in backward'
    expected = plain(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    grads = dict(plain.named_parameters())
    for n, p in checkpointed.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.parametrize('name', FAST_MODELS)
def test_model_backward(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *_input_size(name, TARGET_BWD)))
    out.mean().backward()
    assert out.shape == (2, 42) and not torch.isnan(out).any()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f'no gradient for {missing}'


@pytest.mark.parametrize('name', FAST_MODELS)
def test_model_default_cfg_heads(name):
    """timm's test_model_default_cfgs: feature/pool sizes, pre-logits, classifier resets, names."""
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    x = torch.randn(1, *cfg['input_size'])
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert feats.shape[-2:] == tuple(cfg['pool_size'])
    assert feats.shape[1] == model.num_features
    assert pre.shape[1] == model.head_hidden_size
    model.reset_classifier(0)
    pooled = model(x)
    assert model.num_classes == 0 and pooled.shape == pre.shape
    model.reset_classifier(0, '')
    unpooled = model(x)
    assert unpooled.dim() == 4 and unpooled.shape[-2:] == tuple(cfg['pool_size'])
    model.reset_classifier(7, 'avg')
    assert model(x).shape == (1, 7)
    headless = timm.create_model(name, num_classes=0, global_pool='').eval()
    assert headless(x).shape[-2:] == tuple(cfg['pool_size'])
    assert cfg['classifier'] + '.weight' in state_dict
    assert cfg['first_conv'] + '.weight' in state_dict


@pytest.mark.parametrize('name', ALL_MODELS)
def test_model_builds_on_the_device_it_is_given(name):
    """timm builds on the meta device (no memory) and on a given dtype; every attention module joins it."""
    model = timm.create_model(name, device='meta', dtype=torch.float64)
    off = [
        n
        for n, t in model.state_dict().items()
        if t.device.type != 'meta' or t.is_floating_point() != (t.dtype == torch.float64)
    ]
    assert not off, f'built elsewhere: {off}'


@pytest.mark.parametrize('name', FAST_MODELS)
def test_model_features_only(name):
    model = timm.create_model(name, features_only=True).eval()
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(channels) >= 3
    input_size = _input_size(name, TARGET_FEAT)
    outs = model(torch.randn(1, *input_size))
    assert len(outs) == len(channels)
    for c, r, o in zip(channels, reductions, outs):
        assert o.shape[1] == c
        assert o.shape[2] <= math.ceil(input_size[1] / r) + 1 and o.shape[3] <= math.ceil(input_size[2] / r) + 1
        assert not torch.isnan(o).any()


@pytest.mark.parametrize('name', FAST_MODELS)
def test_model_torchscript(name):
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(name, TARGET_JIT))
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


def test_op_replaced_by_torch_stays_alive_so_scripting_cannot_mistake_another_object_for_it():
    """The conftest workaround behind the torchscript tests: an op object torch drops while TorchScript
    keeps its id() must stay alive, or a module attribute allocated at its address is taken for a builtin."""
    packet = torch.ops.aten.add
    replaced = weakref.ref(packet._op)
    torch._ops._refresh_packet(packet)  # as torch.library does when a namespace gains an overload
    assert packet._op is not replaced()
    assert replaced() is not None
    assert torch.jit._builtins._find_builtin(replaced()) == 'aten::add'

    lib = torch.library.Library('timm_nam_test', 'DEF')
    lib.define('twice(Tensor x) -> Tensor')
    torn_down = weakref.ref(torch.ops.timm_nam_test.twice._op)
    lib._destroy()  # library teardown drops the packet and its op
    assert 'twice' not in vars(torch.ops.timm_nam_test)
    assert torn_down() is not None


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet101_nam', 'mobilenetv2_140_nam', 'mobilenetv2_140_nam_chsp'])
def test_large_models_forward_backward(name):
    model = timm.create_model(name, num_classes=5)
    out = model(torch.randn(2, *_input_size(name, TARGET_BWD)))
    out.sum().backward()
    assert out.shape == (2, 5)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet50_nam', 'mobilenetv2_100_nam_chsp'])
def test_model_compiles_fullgraph(name):
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(name, 64))
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet18_nam'])
def test_model_compiles_with_the_default_backend(name):
    """``torch.compile(model, fullgraph=True)`` with inductor (the default): inference, then a training step whose
    output, gradients and running statistics equal eager's."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled.eval()(x), eager.eval()(x), rtol=1e-3, atol=1e-3)
    out, expected = compiled.train()(x), eager.train()(x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    out.square().sum().backward()
    expected.square().sum().backward()
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-3, atol=1e-4, msg=n)
    buffers = dict(eager.named_buffers())
    for n, b in model.named_buffers():
        torch.testing.assert_close(b, buffers[n], rtol=1e-4, atol=1e-5, msg=n)


def test_save_for_hf_roundtrip(tmp_path):
    """Named architectures serialize: save_for_hf refuses class-valued kwargs."""
    model = timm.create_model('resnet50_cifar_nam_sp').eval()
    save_for_hf(model, tmp_path)
    loaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_unknown_attention_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown block attention 'eca'"):
        timm.create_model('resnet50_cifar', block_attn='eca')


@pytest.mark.parametrize('name', ['resnet50_cifar_nam_chsp', 'mobilenetv2_050_nam_chsp', 'resnet50_cifar_bam'])
def test_fx_feature_extraction_matches_eager(name):
    """torch.fx tracing (timm's feature_cls='fx') goes around NAM's input checks and matches eager."""
    torch.manual_seed(0)
    eager = timm.create_model(name, features_only=True).eval()
    torch.manual_seed(0)
    traced = timm.create_model(name, features_only=True, feature_cls='fx').eval()
    x = torch.randn(1, *_input_size(name, 64))
    eager_features, traced_features = eager(x), traced(x)
    assert len(traced_features) == len(eager_features) == len(eager.feature_info)
    for a, b in zip(eager_features, traced_features, strict=True):
        torch.testing.assert_close(a, b)
