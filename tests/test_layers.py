"""NAM layers: the paper's formulas (float64, train and eval), options, edge cases and timm slots."""

import copy
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn

from tests.helpers import channel_reference, randomize_bn, spatial_reference
from timm_nam import BAM, NAMChannel, NAMChannelSpatial, NAMSpatial, TripletAttention, nam_weights


@pytest.mark.parametrize('weighting', ['sum', 'mean'])
@pytest.mark.parametrize('training', [True, False])
def test_channel_matches_formula_float64(training, weighting):
    layer = NAMChannel(16, weighting=weighting).double()
    randomize_bn(layer.bn)
    ref_bn = nn.BatchNorm2d(16).double()
    ref_bn.load_state_dict(layer.bn.state_dict())
    layer.train(training)
    ref_bn.train(training)
    x = torch.randn(4, 16, 7, 5, dtype=torch.float64) * 3 + 1
    for _ in range(3):  # also checks the running statistics evolve identically
        out = layer(x)
        ref = channel_reference(ref_bn, x, weighting)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.bn.running_mean, ref_bn.running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.bn.running_var, ref_bn.running_var, atol=1e-12, rtol=0)
    assert int(layer.bn.num_batches_tracked) == int(ref_bn.num_batches_tracked)


@pytest.mark.parametrize('weighting', ['sum', 'mean'])
@pytest.mark.parametrize('training', [True, False])
def test_spatial_matches_formula_float64(training, weighting):
    layer = NAMSpatial(6, feat_size=(5, 4), weighting=weighting).double()
    assert layer.bn.weight.shape == (20,)
    randomize_bn(layer.bn)
    ref_bn = nn.BatchNorm1d(20).double()
    ref_bn.load_state_dict(layer.bn.state_dict())
    layer.train(training)
    ref_bn.train(training)
    x = torch.randn(3, 6, 5, 4, dtype=torch.float64) * 2 - 1
    for _ in range(3):
        torch.testing.assert_close(layer(x), spatial_reference(ref_bn, x, weighting), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.bn.running_mean, ref_bn.running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.bn.running_var, ref_bn.running_var, atol=1e-12, rtol=0)


def test_combined_is_channel_then_spatial():
    layer = NAMChannelSpatial(8, feat_size=6).double().eval()
    randomize_bn(layer.channel.bn)
    randomize_bn(layer.spatial.bn)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    expected = spatial_reference(layer.spatial.bn, channel_reference(layer.channel.bn, x))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize('weighting', ['sum', 'mean'])
@pytest.mark.parametrize('make', [NAMChannel, partial(NAMSpatial, feat_size=4)])
def test_gradients_match_formula(make, weighting):
    """Default: no gradient through |γ|/Σ|γ| (authors' .data); option: gradient through it."""
    x = torch.randn(4, 8, 4, 4, dtype=torch.float64)
    for through in (False, True):
        layer = make(8, weighting=weighting).double().train()
        layer.grad_through_weights = through
        randomize_bn(layer.bn)
        ref_bn = (nn.BatchNorm2d(8) if isinstance(layer, NAMChannel) else nn.BatchNorm1d(16)).double()
        ref_bn.load_state_dict(layer.bn.state_dict())
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        layer(xa).square().sum().backward()
        # the weighting written out, not taken from the code under test: |γ| / Σ|γ|, from .data as the authors' code
        scale = ref_bn.weight if through else ref_bn.weight.detach()
        weights = scale.abs() / (scale.abs().sum() if weighting == 'sum' else scale.abs().mean())
        if isinstance(layer, NAMChannel):
            ref = torch.sigmoid(ref_bn(xb) * weights.view(1, -1, 1, 1)) * xb
        else:
            n, c, h, w_ = xb.shape
            y = ref_bn(xb.permute(0, 2, 3, 1).reshape(n, h * w_, c)).reshape(n, h, w_, c).permute(0, 3, 1, 2)
            ref = torch.sigmoid(y * weights.view(1, 1, h, w_)) * xb
        ref.square().sum().backward()
        torch.testing.assert_close(layer.bn.weight.grad, ref_bn.weight.grad, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(layer.bn.bias.grad, ref_bn.bias.grad, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-9, rtol=1e-7)


def test_grad_through_weights_changes_the_scale_gradient():
    x = torch.randn(4, 8, 4, 4)
    grads = []
    for through in (False, True):
        torch.manual_seed(1)
        layer = NAMChannel(8, grad_through_weights=through)
        randomize_bn(layer.bn)
        layer(x).sum().backward()
        grads.append(layer.bn.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_initial_gate_is_about_half():
    """At init every weight is 1/C and BN's output has unit scale, so the gate is σ(x̂/C) ≈ 0.5 for inputs of
    ordinary size, and exactly σ(x/√(1+ε)/C) in eval with fresh running statistics."""
    layer = NAMChannel(4).eval()
    x = torch.zeros(1, 4, 3, 3) + 2.0
    gate = layer(x) / x
    torch.testing.assert_close(gate, torch.full_like(x, 1 / (1 + math.exp(-2.0 / math.sqrt(1 + 1e-5) / 4))))
    assert ((gate - 0.5).abs() < 0.125).all()  # σ(0.5) = 0.62: half a unit from the neutral gate
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3 + 1  # in training BN standardizes with the batch statistics: σ(x̂/4)
    x = torch.where(x.abs() < 0.1, torch.ones_like(x), x)
    gate = NAMChannel(4).train()(x) / x
    assert ((gate > 0.22) & (gate < 0.78)).all() and abs(float(gate.mean()) - 0.5) < 0.02  # |x̂| < 5: σ(±1.25)


@pytest.mark.parametrize(
    'make', [lambda: NAMChannel(5), lambda: NAMSpatial(5, feat_size=3), lambda: NAMChannelSpatial(5, 3)]
)
@pytest.mark.parametrize('training', [True, False])
def test_all_zero_scales_give_half_gate_not_nan(make, training):
    layer = make().train(training)
    for m in layer.modules():
        if isinstance(m, (NAMChannel, NAMSpatial)):
            nn.init.zeros_(m.bn.weight)
            m.grad_through_weights = True
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    out = layer(x)
    assert torch.isfinite(out).all()
    expected = x * 0.5 if not isinstance(layer, NAMChannelSpatial) else x * 0.25
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all()
    assert torch.equal(nam_weights(torch.zeros(3)), torch.zeros(3))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match='built for 8 channels, got input with 4 channels'):
        NAMChannel(8)(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r'4D \(N, C, H, W\) input, got 3D'):
        NAMChannel(8)(torch.randn(8, 3, 3))
    with pytest.raises(ValueError, match=r'4D \(N, C, H, W\) input, got 2D'):
        NAMSpatial(8, feat_size=3)(torch.randn(2, 8))
    with pytest.raises(ValueError, match='built for 7x7 feature maps, got 14x14'):
        NAMSpatial(8, feat_size=7)(torch.randn(1, 8, 14, 14))
    with pytest.raises(TypeError, match='NAMSpatial needs feat_size'):
        NAMSpatial(8)
    with pytest.raises(TypeError, match='unexpected keyword argument.*momentun'):
        NAMChannel(8, momentun=0.2)


def test_accepts_timm_attention_kwargs():
    layer = NAMChannel(8, act_layer=nn.SiLU, rd_ratio=0.25, device='cpu', dtype=torch.float64)
    assert layer.bn.weight.dtype == torch.float64
    assert sum(p.numel() for p in layer.parameters()) == 16


def test_timm_attn_layer_and_se_layer_slots():
    resnet = timm.create_model('resnet50', block_args=dict(attn_layer=NAMChannel), num_classes=10).eval()
    nams = [m for m in resnet.modules() if isinstance(m, NAMChannel)]
    assert len(nams) == 16 and all(b.se is not None for s in (resnet.layer1, resnet.layer4) for b in s)
    assert resnet(torch.randn(1, 3, 64, 64)).shape == (1, 10)

    effnet = timm.create_model('efficientnet_b0', se_layer=NAMChannel, num_classes=10).eval()
    assert len([m for m in effnet.modules() if isinstance(m, NAMChannel)]) == 16
    out = effnet(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10) and torch.isfinite(out).all()

    sized = timm.create_model('resnet18', block_args=dict(attn_layer=partial(NAMSpatial, feat_size=8)))
    with pytest.raises(ValueError, match='built for 8x8 feature maps, got 16x16'):
        sized(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize('weighting', ['sum', 'mean'])
@pytest.mark.parametrize(
    'make', [NAMChannel, partial(NAMSpatial, feat_size=5), partial(NAMChannelSpatial, feat_size=5)]
)
def test_torchscript_matches_eager(make, weighting):
    layer = make(8, weighting=weighting)
    scripted = torch.jit.script(layer)
    x = torch.randn(2, 8, 5, 5)
    for training in (True, False):
        layer.train(training)
        scripted.train(training)
        torch.testing.assert_close(scripted(x), layer(x))


@pytest.mark.parametrize('weighting', ['sum', 'mean'])
@pytest.mark.parametrize('backend', ['aot_eager', 'inductor'])
def test_compile_fullgraph_matches_eager(backend, weighting):
    layer = NAMChannelSpatial(8, 5, weighting=weighting).train()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(compiled(x), layer(x))
    layer.eval()
    torch.testing.assert_close(compiled(x), layer(x))


def test_sync_batchnorm_conversion_keeps_the_eval_gate():
    layer = NAMChannel(4).eval()
    randomize_bn(layer.bn)
    x = torch.randn(2, 4, 3, 3)
    expected = layer(x)
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(layer).eval()
    assert isinstance(converted.bn, nn.SyncBatchNorm)
    torch.testing.assert_close(converted(x), expected)


def test_baseline_layers_shapes_and_counts():
    x = torch.randn(2, 256, 8, 8)
    bam = BAM(256)
    assert bam(x).shape == x.shape
    assert sum(p.numel() for p in bam.parameters()) == 17361
    tam = TripletAttention(256)
    assert tam(x).shape == x.shape
    assert sum(p.numel() for p in tam.parameters()) == 300


@pytest.mark.parametrize('combine', ['sum', 'product'])
def test_bam_combines_branches_as_the_paper_or_the_authors_code(combine):
    torch.manual_seed(0)
    bam = BAM(32, combine=combine).eval()
    x = torch.randn(2, 32, 6, 6)
    mc = bam.channel_gate(x)[:, :, None, None]
    ms = bam.spatial_gate(x)
    att = mc + ms if combine == 'sum' else mc * ms  # BAM paper Eq. 1-2 / Jongchan/attention-module's bam.py
    torch.testing.assert_close(bam(x), x * (1 + torch.sigmoid(att)))
    assert BAM(32).combine == 'sum'
    with pytest.raises(ValueError, match="combine must be 'sum'"):
        BAM(32, combine='max')


@pytest.mark.parametrize('dtype,tol', [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize('make', [lambda: NAMChannel(8), lambda: NAMSpatial(8, feat_size=5)])
@pytest.mark.parametrize('training', [True, False])
def test_low_precision_close_to_float64_formula(make, dtype, tol, training):
    """Half-precision activations (as under AMP) with float32 parameters, against the float64 formula."""
    layer = make()
    randomize_bn(layer.bn)
    ref = copy.deepcopy(layer).double()
    layer.train(training)
    ref.train(training)
    x = torch.randn(4, 8, 5, 5)
    out = layer(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref(x.double()), atol=tol, rtol=tol)


def test_inference_path_reuses_buffers_and_matches_autograd_path():
    layer = NAMChannel(8).eval()
    randomize_bn(layer.bn)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.clone().requires_grad_())
    torch.testing.assert_close(fast, slow.detach())
    assert slow.grad_fn is not None


def test_mean_weighting_is_c_times_the_papers():
    layer = NAMChannel(16, weighting='mean')
    randomize_bn(layer.bn)
    paper = NAMChannel(16)
    paper.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer.weights(), 16 * paper.weights())
    torch.testing.assert_close(layer.weights().mean(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="weighting must be 'sum'"):
        NAMChannel(4, weighting='max')


def test_simam_is_the_authors_formula_float64():
    """SimAM as the authors' ``simam_module`` computes it: n = H·W - 1, λ = 1e-4, + 0.5 inside the sigmoid."""
    from timm_nam.layers import SimAM

    x = torch.randn(3, 5, 6, 7, dtype=torch.float64) * 3 + 1
    b, c, h, w = x.shape
    d = (x - x.mean(dim=[2, 3], keepdim=True)).pow(2)
    expected = x * torch.sigmoid(d / (4 * (d.sum(dim=[2, 3], keepdim=True) / (w * h - 1) + 1e-4)) + 0.5)
    torch.testing.assert_close(SimAM(5)(x), expected, rtol=0, atol=1e-13)
    assert sum(p.numel() for p in SimAM(5).parameters()) == 0


def test_half_control_is_plain_resnet_with_each_branch_halved():
    """resnet18_half computes plain ResNet-18 with every block's bn2 output times 0.5 (so, its affine halved)."""
    torch.manual_seed(0)
    plain = timm.create_model('resnet18', num_classes=5).double()
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # away from timm's zero-init, so every branch contributes
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)
    half = timm.create_model('resnet18_half', num_classes=5).double()
    half.load_state_dict(plain.state_dict())  # the same keys: the control adds no parameters or buffers
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    out = half(x)
    for block in [b for s in (plain.layer1, plain.layer2, plain.layer3, plain.layer4) for b in s]:
        block.bn2.weight.data *= 0.5
        block.bn2.bias.data *= 0.5
    torch.testing.assert_close(out, plain(x), rtol=1e-10, atol=1e-10)
    assert sum(p.numel() for p in half.parameters()) == sum(p.numel() for p in plain.parameters())


def test_the_name_nam_before_0_2_still_gives_the_channel_then_spatial_layer_with_a_warning():
    import timm_nam
    from timm_nam import NAMChannelSpatial

    with pytest.warns(DeprecationWarning, match='NAMChannelSpatial'):
        assert timm_nam.NAM is NAMChannelSpatial
    with pytest.warns(DeprecationWarning):
        from timm_nam.layers import NAM
    assert NAM is NAMChannelSpatial
