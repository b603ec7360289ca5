"""Pretrained NAM networks from timm's plain weights: the conversion, ``pretrained=True`` through timm's own loader
(offline, from a Hugging Face cache laid out as timm's plain repository), and `add_nam` on timm's families.

The plain networks are random, with non-trivial batch-norm states: `trained_like_` (which reproduces the error of a
trained ResNet-18) where every block is residual, `randomized_bn_` for the inverted-residual family, whose random
networks are chaotic with trained-like states. The bounds are the ones results/pretrained_conversion/ documents for
these states: ResNets 5e-3, the inverted-residual and other families 2e-2, spatial forms at their 224-px size 5e-2
(relative L2 difference of the logits, eval mode). Trained ImageNet weights on real photos: tests/test_real_weights.py.
"""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import torch.nn as nn
from safetensors.torch import save_file

import timm_nam
from tests.helpers import bn_states_, hf_cache_snapshot, offline_hub_env, placement_errors
from timm_nam import NAMChannel, NAMSpatial, add_nam, load_plain_weights
from timm_nam.convert import GATE_SLOPE, SCALE_INIT, plain_to_nam_state_dict, start_scale
from timm_nam.layers import NormNAM
from timm_nam.models import MODEL_MODULES, NAMPlacementError, nam_sites
from timm_nam.models._cfg import PLAIN_TAG_PREFIX

IMAGES = torch.randn(40, 3, 64, 64, generator=torch.Generator().manual_seed(0))
X, CALIBRATION = IMAGES[:8], IMAGES[8:]
RESNET_BOUND, OTHER_BOUND, SPATIAL_BOUND = 5e-3, 2e-2, 5e-2
REVISION = 'b' * 40


def _plain(arch: str, size: int = 64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    images = CALIBRATION if size == 64 else torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1))
    return bn_states_(timm.create_model(arch, **kwargs), images)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / a.norm()).item()


def _plain_source(name: str) -> str:
    """The timm weights a NAM model's default tag converts: 'resnet50.a1_in1k'."""
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id.split('/', 1)[1]


PLAIN_TAGGED = sorted(
    n
    for n in timm.list_models(module=list(MODEL_MODULES))
    if (timm.models.get_pretrained_cfg(n).tag or '').startswith(PLAIN_TAG_PREFIX)
)


def test_every_nam_model_with_timm_weights_has_them_as_its_default_tag():
    """Each ImageNet NAM model's default tag is plain_<tag> of timm's weights of its plain network, with what timm's cfg
    says of them: the literal cfgs stay in step with the installed timm."""
    # the model 'nam' (any base) takes its base's cfg and weights when built; it has no tag of its own
    imagenet_nam = sorted(n for n in timm.list_models(module=list(MODEL_MODULES)) if '_nam' in n and 'cifar' not in n)
    assert PLAIN_TAGGED == imagenet_nam and 'efficientnet_lite0_nam' in PLAIN_TAGGED
    for name in PLAIN_TAGGED:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        plain = timm.models.get_pretrained_cfg(_plain_source(name)).to_dict()
        assert cfg['tag'] == PLAIN_TAG_PREFIX + plain['tag'] and cfg['hf_hub_id'] == plain['hf_hub_id']
        for key in ('input_size', 'crop_pct', 'interpolation', 'mean', 'std', 'license', 'num_classes'):
            assert cfg.get(key) == plain.get(key), (name, key)
        # a model built for one input size (pixel attention) has no other test size
        assert cfg.get('test_input_size') == (None if cfg['fixed_input_size'] else plain.get('test_input_size'))
        assert cfg['first_conv'] == plain['first_conv'] and cfg['classifier'] == plain['classifier']
        assert f"timm's plain {_plain_source(name)} ImageNet weights, not NAM-trained" in cfg['notes']
    # baselines and CIFAR models have no weights: no tags
    assert not [n for n in timm.list_pretrained(['resnet18_se*', 'resnet50_cifar*', 'mobilenetv2_100_se*'])]


def _hf_cache(root, repo: str, state: dict):
    """huggingface_hub's cache layout for ``repo`` holding ``state`` as model.safetensors."""
    snap = hf_cache_snapshot(root, repo, REVISION)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snap / 'model.safetensors'))


def _offline(code: str, cache) -> dict:
    proc = subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=offline_hub_env(cache),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [('resnet34_nam', 64, RESNET_BOUND), ('mobilenetv2_050_nam', 64, OTHER_BOUND)]
CASES += [('efficientnet_b0_nam', 64, OTHER_BOUND), ('resnet18_nam_sp', 224, SPATIAL_BOUND)]
CASES += [('mobilenetv2_050_nam_chsp', 224, SPATIAL_BOUND)]


def test_pretrained_true_loads_timms_plain_repo_and_matches_the_plain_network(tmp_path):
    """``timm.create_model(name, pretrained=True)`` reads timm's plain repository through timm's own Hub loader and
    computes what the plain network does; ``num_classes=``, ``features_only=True`` and a weights file given by
    ``pretrained_cfg_overlay`` work on the same weights."""
    cache, expected, plains = tmp_path / 'cache', {}, {}
    for name, size, _ in sorted(CASES, key=lambda case: -case[1]):  # one plain network per repository
        source = _plain_source(name)
        if source not in plains:
            plains[source] = _plain(source.split('.')[0], size)
            _hf_cache(cache, f'timm/{source}', plains[source].state_dict())
        save_file(plains[source].state_dict(), str(tmp_path / f'{name}.safetensors'))
        x = X if size == 64 else torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
        torch.save(x, tmp_path / f'{name}.x.pt')
        with torch.no_grad():
            expected[name] = plains[source](x)
    outs = _offline(
        f"""
        import json, torch, timm
        outs = {{}}
        for name in {[n for n, _, _ in CASES]!r}:
            x = torch.load({str(tmp_path)!r} + f'/{{name}}.x.pt', weights_only=True)
            model = timm.create_model(name, pretrained=True).eval()
            head = timm.create_model(name, pretrained=True, num_classes=10).eval()
            features = timm.create_model(name, pretrained=True, features_only=True).eval()
            file = {str(tmp_path)!r} + f'/{{name}}.safetensors'
            from_file = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=file)).eval()
            with torch.no_grad():
                logits = model(x)
                outs[name] = dict(
                    logits=logits.tolist(),
                    tag=model.pretrained_cfg['tag'],
                    head=list(head(x).shape),
                    same_features=bool(torch.equal(head.forward_features(x), model.forward_features(x))),
                    features=bool(all(torch.equal(a, b) for a, b in zip(
                        features(x), model.forward_intermediates(x, intermediates_only=True), strict=True))),
                    from_file=bool(torch.equal(from_file(x), logits)),
                )
        print(json.dumps(outs))
        """,
        cache,
    )
    for name, _, bound in CASES:
        out = outs[name]
        assert out['tag'] == timm.models.get_pretrained_cfg(name).tag
        assert _rel(expected[name], torch.tensor(out['logits'])) < bound, name
        assert out['head'][1] == 10 and out['same_features'] and out['features'] and out['from_file'], name


def test_wrong_or_missing_plain_weights_are_errors_naming_model_source_and_problem(tmp_path):
    cache = tmp_path / 'cache'
    _hf_cache(cache, 'timm/resnet18.a1_in1k', timm.create_model('resnet34').state_dict())  # the wrong network
    code = """
        import json, timm
        errors = {}
        for name in ('resnet18_nam', 'resnet34_nam'):  # resnet34's repository is not in the cache
            try:
                timm.create_model(name, pretrained=True)
            except Exception as e:
                errors[name] = f'{type(e).__name__}: {e}'
        print(json.dumps(errors))
    """
    errors = _offline(code, cache)
    assert errors['resnet18_nam'].startswith(
        'RuntimeError: Could not load pretrained weights for resnet18_nam (plain_a1_in1k tag) from '
        'timm/resnet18.a1_in1k: '
    )
    assert 'layer1.2.bn2' in errors['resnet18_nam'] or 'layer1.2' in errors['resnet18_nam']
    assert (
        'Could not load pretrained weights for resnet34_nam (plain_a1_in1k tag) from timm/resnet34.a1_in1k'
        in (errors['resnet34_nam'])
    )
    with pytest.raises(ValueError, match=r'Cannot load the given state dict into resnet18_nam: .*layer4\.1\.bn2'):
        load_plain_weights(
            timm.create_model('resnet18_nam'),
            {k: v for k, v in _plain('resnet18').state_dict().items() if not k.startswith('layer4.1.bn2')},
        )
    weights = tmp_path / 'resnet50.safetensors'
    save_file(timm.create_model('resnet50').state_dict(), str(weights))
    with pytest.raises(ValueError, match=rf'Cannot load {weights} into resnet18_nam: ') as error:
        load_plain_weights(timm.create_model('resnet18_nam'), weights)
    assert 'size mismatch for layer1.0.conv1.weight' in str(error.value)
    assert 'Unexpected key(s) in state_dict: "layer1.2.' in str(error.value)
    with pytest.raises(ValueError, match=rf'{tmp_path}/junk.pth cannot be read as weights'):
        (tmp_path / 'junk.pth').write_text('not a checkpoint')
        load_plain_weights(timm.create_model('resnet18_nam'), tmp_path / 'junk.pth')


def test_conversion_doubles_each_gated_norm_and_gives_the_gate_the_statistics_of_its_input():
    """In float64: a converted site computes 2·norm(y) before one gate, 4·norm(y) before a channel and a spatial gate
    (each about 0.5), and each gate's running statistics are the mean and variance of the tensor it gates (per
    channel; per pixel the channels' pooled statistics), so NAM's x̂ is standardized; each gate starts at its
    `start_scale`."""
    plain = _plain('resnet18').double()
    torch.manual_seed(3)
    y = torch.randn(64, 64, 4, 4, dtype=torch.float64) * 2 + 1
    norm = plain.layer1[0].bn2
    norm.running_mean.copy_(y.mean((0, 2, 3)))
    norm.running_var.copy_(y.var((0, 2, 3), unbiased=False))
    for kind in ('nam', 'nam_sp', 'nam_chsp'):
        nam = timm.create_model('resnet18', num_classes=10).double()
        add_nam(nam, kind, img_size=16)
        load_plain_weights(nam, plain)
        site = nam.layer1[0].bn2.eval()
        gates = [site.nam.channel, site.nam.spatial] if kind == 'nam_chsp' else [site.nam]
        kinds = {'nam': [NAMChannel], 'nam_sp': [NAMSpatial], 'nam_chsp': [NAMChannel, NAMSpatial]}
        assert [type(g) for g in gates] == kinds[kind]
        gain = 2.0 ** len(gates)
        torch.testing.assert_close(site.norm.weight, gain * norm.weight)
        torch.testing.assert_close(site.norm.bias, gain * norm.bias)
        x = site.norm(y)
        for gate in gates:
            assert torch.all(gate.bn.weight == start_scale(gate)) and torch.all(gate.bn.bias == 0)
            if isinstance(gate, NAMChannel):
                mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
            else:  # per pixel over batch and channels; the plain norm's statistics say nothing about position
                mean, var = x.mean().expand(16), x.var(unbiased=False).expand(16)
            torch.testing.assert_close(gate.bn.running_mean, mean)
            torch.testing.assert_close(gate.bn.running_var, var)
            x = x / 2  # what the next gate sees: this one's input times about 0.5
        with torch.no_grad():  # the site as a whole: the plain norm's output, up to the gates' first-order term
            assert _rel(norm.eval()(y), site(y)) < 2e-2
    # a state dict that is already NAM's passes through (the pretrained filter sees NAM weights too)
    nam_state = nam.state_dict()
    assert plain_to_nam_state_dict(nam_state, nam) is nam_state


def test_each_gate_starts_with_its_slope_bounded():
    """A converted gate starts at scale 0.5, lower where its slope at the start (s/n with the paper's weighting over n
    channels or pixels, s with 'mean') would exceed GATE_SLOPE: narrow layers and the 'mean' weighting."""
    for channels, expected in ((16, 16 * GATE_SLOPE), (64, 64 * GATE_SLOPE), (128, SCALE_INIT), (2048, SCALE_INIT)):
        assert start_scale(NAMChannel(channels)) == pytest.approx(expected)
    assert start_scale(NAMChannel(2048, weighting='mean')) == pytest.approx(GATE_SLOPE)
    assert start_scale(NAMSpatial(8, feat_size=7)) == pytest.approx(49 * GATE_SLOPE)
    assert start_scale(NAMChannel(16), scale_init=1.0, max_slope=1.0) == 1.0
    model = add_nam(_plain('mobilenetv2_050'), blocks_without_skip=True)
    for gate in (m for m in model.modules() if isinstance(m, NAMChannel)):
        assert torch.all(gate.bn.weight * gate.weights() <= GATE_SLOPE * (1 + 1e-6))


def test_what_remains_is_the_gates_first_order_term():
    """The converted network differs from the plain one by the gates' s·x̂/(2n) term: in proportion to NAM's starting
    scale, with either weighting; bounding the slope brings 'mean' weighting, whose gates are not near-constant at the
    paper's start, as close as the paper's."""
    plain = _plain('resnet18')
    with torch.no_grad():
        expected = plain(X)

    def error(scale, weighting='sum', max_slope=1.0):
        nam = timm.create_model('resnet18_nam', nam_weighting=weighting).eval()
        load_plain_weights(nam, plain, scale_init=scale, max_slope=max_slope)
        with torch.no_grad():
            return _rel(expected, nam(X))

    errors = {scale: error(scale) for scale in (1.0, 0.5, 0.25)}
    assert 0.45 < errors[0.5] / errors[1.0] < 0.55 and 0.45 < errors[0.25] / errors[0.5] < 0.55
    assert error(0.01, 'mean') / error(0.02, 'mean') == pytest.approx(0.5, abs=0.05)
    assert error(SCALE_INIT, 'mean') > 20 * errors[SCALE_INIT]  # unbounded: w ≈ 1, the gate far from constant
    bounded = error(SCALE_INIT, max_slope=GATE_SLOPE)
    assert bounded < errors[SCALE_INIT] and error(SCALE_INIT, 'mean', GATE_SLOPE) < 2 * bounded < RESNET_BOUND


def test_load_plain_weights_reads_models_files_and_state_dicts_alike(tmp_path):
    plain = _plain('mobilenetv2_050')
    save_file(plain.state_dict(), str(tmp_path / 'w.safetensors'))
    torch.save(plain.state_dict(), tmp_path / 'w.pth')
    models = [
        load_plain_weights(timm.create_model('mobilenetv2_050_nam'), source).eval()
        for source in (plain, plain.state_dict(), tmp_path / 'w.safetensors', tmp_path / 'w.pth')
    ]
    with torch.no_grad():
        outs = [m(X) for m in models]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert _rel(plain(X), outs[0]) < OTHER_BOUND
    head = load_plain_weights(timm.create_model('mobilenetv2_050_nam', num_classes=10), plain)  # head left as is
    assert head.classifier.out_features == 10 and torch.equal(head.conv_head.weight, plain.conv_head.weight)


FAMILIES = [
    ('resnet18', RESNET_BOUND),
    ('resnet26d', RESNET_BOUND),
    ('resnext50_32x4d', RESNET_BOUND),
    ('seresnet18', RESNET_BOUND),  # an SE gate between the norm and the add
    ('ecaresnet26t', RESNET_BOUND),  # an ECA gate, expanded to the branch's shape
    ('resnest14d', RESNET_BOUND),
    ('regnetx_002', OTHER_BOUND),
    ('regnetz_b16', OTHER_BOUND),
    ('resnext26ts', OTHER_BOUND),
    ('dla34', OTHER_BOUND),
    ('hgnetv2_b0', OTHER_BOUND),  # a norm-act and a learnable affine between the norm and the add
    ('mobilenetv2_050', OTHER_BOUND),
    ('mobilenetv3_small_050', OTHER_BOUND),
    ('mobilenetv4_conv_small', OTHER_BOUND),
    ('efficientnet_b0', OTHER_BOUND),
    ('tf_efficientnetv2_b0', OTHER_BOUND),
    ('cspdarknet53', OTHER_BOUND),  # a norm-act with a LeakyReLU ends each branch
    ('cs3darknet_s', OTHER_BOUND),
]


@pytest.mark.parametrize('arch,bound', FAMILIES)
def test_add_nam_keeps_what_the_network_computes_and_trains(arch, bound):
    """Every branch that ends in a batch norm gets a gate right after that norm (its activation, if any, moved behind
    the gate), the gates are where timm's block modules say the residual branches end (`placement_errors`), the
    network computes what it did, and a training step with the penalty reaches every gate."""
    model = _plain(arch, num_classes=10)
    sites = nam_sites(model)
    acts = {s: type(getattr(model.get_submodule(s), 'act', nn.Identity())) for s in sites}
    with torch.no_grad():
        expected = model(X)
    assert add_nam(model) is model
    with torch.no_grad():
        assert _rel(expected, model(X)) < bound
    assert placement_errors(model) == ([], [])
    for site, act in acts.items():
        norm_nam = model.get_submodule(site)
        assert isinstance(norm_nam, NormNAM) and isinstance(norm_nam.nam, NAMChannel)
        assert isinstance(norm_nam.act, act) and isinstance(getattr(norm_nam.norm, 'act', nn.Identity()), nn.Identity)
    gates = [model.get_submodule(s).nam for s in sites]
    scales = timm_nam.nam_scales(model)
    assert len(scales) == len(sites) and {id(s) for s in scales} == {id(g.bn.weight) for g in gates}
    model.train()
    loss = timm_nam.NAMSparsityLoss(nn.CrossEntropyLoss(), model)(model(X), torch.arange(8) % 10)
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)


def test_the_placement_check_finds_a_misplaced_gate():
    """The check the family tests rely on reads timm's block modules, not the placement's graph, and can fail: a gate
    after a norm inside the branch, and a branch left without its gate, are both reported."""
    model = add_nam(_plain('resnet18'))
    model.layer2[0].bn1 = NormNAM(model.layer2[0].bn1, NAMChannel(128))  # inside the branch, before its activation
    model.layer3[1].bn2 = model.layer3[1].bn2.norm
    assert placement_errors(model) == (['layer2.0.bn1'], ['layer3.1.bn2'])


@pytest.mark.parametrize(
    'arch,site',
    [
        ('mobileone_s0', 'stages.0.1.conv_kxk.0.bn'),  # one of a block's parallel branches
        ('repvgg_a0', 'stages.0.0.conv_kxk.bn'),
        ('res2net50_14w_8s', 'layer1.0.bns.0'),  # a hierarchical split sum inside a block
        ('hrnet_w18_small_v2', 'stage2.0.fuse_layers.0.1.1'),  # a multi-resolution fusion sum
    ],
)
def test_the_placement_check_fails_on_gates_that_are_not_on_a_residual_branch(arch, site):
    """Gating a sum that is not a residual branch's, as the placement once did in these networks, fails the check."""
    model = timm.create_model(arch)
    norm = model.get_submodule(site)
    parent, _, attr = site.rpartition('.')
    setattr(model.get_submodule(parent), attr, NormNAM(norm, NAMChannel(norm.num_features)))
    assert site in placement_errors(model)[0]


@pytest.mark.parametrize(
    'arch,gates',
    [('res2net50_14w_8s', 16), ('hrnet_w18_small_v2', 44), ('rexnet_100', 11), ('ghostnet_100', 32)],
)
def test_add_nam_gates_residual_branches_only(arch, gates):
    """Res2Net's split sums and HRNet's fusion sums are not residual adds: one gate per residual block. RexNet's
    residual adds into the first channels of its branch (``x[:, :C] += shortcut``) and GhostNet's branch ends in a
    slice of a concatenation of two norms: gated after those norms (both of GhostNet's). Each converts."""
    model = _plain(arch, num_classes=10)
    with torch.no_grad():
        expected = model(X)
    add_nam(model)
    assert len(timm_nam.nam_scales(model)) == gates and placement_errors(model) == ([], [])
    with torch.no_grad():
        assert _rel(expected, model(X)) < OTHER_BOUND


@pytest.mark.parametrize('arch', ['mobileone_s0', 'repvgg_a0'])
def test_sums_of_parallel_branches_are_refused_with_the_case(arch):
    with pytest.raises(NAMPlacementError, match=f'Cannot add NAM to {arch}: its sums .* add parallel branches'):
        add_nam(_plain(arch))


def test_add_nam_gives_a_plain_network_the_registered_nam_model():
    """The registered inverted-residual models gate every block, as the paper counts MobileNetV2's 17; add_nam does
    so when asked (by default it gates the residual branches only)."""
    assert len(nam_sites(_plain('mobilenetv2_100'))) == 10
    plain = _plain('mobilenetv2_100')
    added = add_nam(plain, blocks_without_skip=True)
    registered = load_plain_weights(timm.create_model('mobilenetv2_100_nam'), _plain('mobilenetv2_100'))
    assert list(added.state_dict()) == list(registered.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(added(X), registered.eval()(X))


@pytest.mark.parametrize(
    'arch,reason',
    [
        ('convnext_atto', "it has no batch norm (NAM gates a batch norm's output with that norm's statistics)"),
        ('vit_tiny_patch16_224', 'it has no batch norm'),
        ('densenet121', 'it has no residual add (NAM gates the branch of a residual block, before the add)'),
        ('resnetv2_50', 'none of its residual branches ends in a batch norm; they end in Conv2d ×16 (pre-activation'),
        ('repghostnet_050', 'none of its residual branches ends in a batch norm; they end in a sum of branches (add)'),
    ],
)
def test_add_nam_refuses_networks_it_cannot_convert_and_leaves_them_unchanged(arch, reason):
    model = timm.create_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NAMPlacementError, match=rf'Cannot add NAM to {arch}: {re.escape(reason)}'):
        add_nam(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


class _ResidualBlock(nn.Module):
    """A conv-BN residual block whose forward torch.fx cannot trace (``data_dependent``) or whose traced graph fails
    on every image size add_nam tries (an assert without a message, as timm's attention blocks have)."""

    def __init__(self, data_dependent: bool):
        super().__init__()
        self.conv, self.bn, self.data_dependent = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), data_dependent

    def forward(self, x):
        if self.data_dependent and x.sum() > 0:
            return x
        torch._assert(x.shape[-1] == 20, '')
        return x + self.bn(self.conv(x))


@pytest.mark.parametrize(
    'data_dependent,reason',
    [
        (True, 'torch.fx cannot trace it (TraceError: symbolically traced variables cannot be used as inputs'),
        (False, 'its traced graph fails on a 224x224 image (AssertionError)'),
    ],
)
def test_add_nam_says_why_it_cannot_analyse_a_network(data_dependent, reason):
    with pytest.raises(NAMPlacementError, match=rf'Cannot add NAM to _ResidualBlock: {re.escape(reason)}'):
        add_nam(_ResidualBlock(data_dependent))
    assert add_nam(_ResidualBlock(False), img_size=20).bn.nam.bn.weight.shape == (3,)


def test_add_nam_checks_every_block_before_changing_any():
    model = _plain('resnet18')
    model.layer3[1].bn2 = nn.BatchNorm2d(256, affine=False)  # one block's last norm has no scale to gate with
    types = [type(m) for m in model.modules()]
    with pytest.raises(
        NAMPlacementError,
        match='Cannot add NAM to resnet18: layer3.1.bn2 is a BatchNorm2d without affine parameters or running stat',
    ):
        add_nam(model)
    assert [type(m) for m in model.modules()] == types
    twice = add_nam(_plain('resnet18'))
    with pytest.raises(NAMPlacementError, match='layer1.0.bn2 already has a NAM gate'):
        add_nam(twice)
    with pytest.raises(NAMPlacementError, match='spatial NAM needs img_size='):
        add_nam(_plain('resnet18'), kind='nam_sp')
