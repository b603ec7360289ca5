"""The model ``nam``: any timm network with NAM by name (``timm.create_model('nam', base=...)``, train.py's
``--model nam --model-kwargs base=...``), on bases that have no registered NAM model."""

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config

from tests.helpers import bn_states_
from timm_nam import add_nam
from timm_nam.layers import ConstantScale, NAMChannel
from timm_nam.models import NAMPlacementError, nam_sites

BASE = 'regnety_002'  # no registered NAM model


@pytest.fixture(scope='module')
def plain():
    """A plain ``regnety_002`` with trained-like batch-norm states, and its weights as a file."""
    torch.manual_seed(0)
    model = timm.create_model(BASE)
    return bn_states_(model, torch.randn(32, 3, 64, 64))


@pytest.fixture(scope='module')
def weights_file(plain, tmp_path_factory):
    file = tmp_path_factory.mktemp('weights') / f'{BASE}.safetensors'
    save_file(plain.state_dict(), str(file))
    return str(file)


def test_nam_is_the_base_with_add_nams_gates_and_its_weights_converted(plain, weights_file):
    model = timm.create_model('nam', base=BASE, pretrained=True, pretrained_cfg_overlay=dict(file=weights_file))
    reference = add_nam(copy.deepcopy(plain))
    assert type(model) is type(plain)
    own, expected = model.state_dict(), reference.state_dict()
    assert list(own) == list(expected)
    for key in expected:
        torch.testing.assert_close(own[key], expected[key], rtol=0, atol=0, msg=key)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        error = (model.eval()(x) - plain(x)).norm() / plain(x).norm()
    assert error < 5e-3


def test_its_cfg_and_data_config_are_the_bases(plain, weights_file):
    overlay = dict(file=weights_file, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    model = timm.create_model('nam', base=BASE, pretrained=True, pretrained_cfg_overlay=overlay)
    assert model.pretrained_cfg['architecture'] == 'nam'  # what a saved config.json rebuilds
    expected = dict(resolve_data_config({}, model=plain), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert resolve_data_config({}, model=model) == expected


def test_nam_options_and_the_bases_kwargs_pass_through():
    model = timm.create_model('nam', base='efficientnet_lite0', weighting='mean', num_classes=7, drop_rate=0.3)
    gates = [m for m in model.modules() if isinstance(m, NAMChannel)]
    assert len(gates) == 9 and all(g.weighting == 'mean' for g in gates)  # the residual branches
    assert model.num_classes == 7 and model.drop_rate == 0.3
    every = timm.create_model('nam', base='efficientnet_lite0', blocks_without_skip=True)
    assert len([m for m in every.modules() if isinstance(m, NAMChannel)]) == 16
    timm_kwargs = timm.create_model('nam', base='resnet18', block_args=dict(attn_layer='se'))
    assert all(hasattr(block, 'se') for block in timm_kwargs.layer1)


def test_nam_penalty_is_applied_at_every_optimizer_step():
    model = timm.create_model('nam', base=BASE, nam_penalty=1e-2)
    scales = [m.bn.weight for m in model.modules() if isinstance(m, NAMChannel)]
    optimizer = torch.optim.SGD(scales, lr=1.0)
    (model(torch.randn(2, 3, 64, 64)) * 0).sum().backward()
    optimizer.step()
    assert all(torch.equal(s.detach(), torch.full_like(s, 0.99)) for s in scales)  # 1 - lr·p·sign(1)


def test_the_half_control_computes_what_the_plain_network_does(plain, weights_file):
    """kind='half': NAM's start without the gate, a constant 0.5 after the norm whose affine is doubled."""
    model = timm.create_model(
        'nam', base=BASE, kind='half', pretrained=True, pretrained_cfg_overlay=dict(file=weights_file)
    )
    assert len([m for m in model.modules() if isinstance(m, ConstantScale)]) == len(nam_sites(plain))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x))


@pytest.mark.parametrize(
    'base,error,words',
    [
        ('convnext_atto', NAMPlacementError, 'Cannot add NAM to convnext_atto: it has no batch norm'),
        ('densenet121', NAMPlacementError, 'Cannot add NAM to densenet121: it has no residual add'),
        ('no_such_net', ValueError, "base='no_such_net' is not a timm model"),
    ],
)
def test_a_base_nam_cannot_go_into_is_refused_with_the_case(base, error, words):
    with pytest.raises(error, match=words):
        timm.create_model('nam', base=base)


def test_features_only_gives_the_bases_feature_maps():
    model = timm.create_model('nam', base='resnet18', features_only=True, out_indices=(2, 4))
    shapes = [tuple(f.shape) for f in model(torch.randn(1, 3, 64, 64))]
    assert shapes == [(1, 128, 8, 8), (1, 512, 2, 2)]
    assert len([m for m in model.modules() if isinstance(m, NAMChannel)]) == 8


def test_pretrained_without_weights_is_an_error_that_says_how_to_give_them(tmp_path):
    with pytest.raises(
        ValueError, match="'nam' with base efficientnet_lite1 has no pretrained weights.*--pretrained-path"
    ):
        timm.create_model('nam', base='efficientnet_lite1', pretrained=True)
    missing = str(tmp_path / 'missing.safetensors')
    with pytest.raises(RuntimeError, match=f'Could not load pretrained weights for .* from {missing}'):
        timm.create_model('nam', base=BASE, pretrained=True, pretrained_cfg_overlay=dict(file=missing))
