"""timm's batch-norm utilities on NAM layers and models: freezing, unfreezing, syncing, reparameterizing."""

import copy

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d, unfreeze_batch_norm_2d
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d
from timm.utils import reparameterize_model

from tests.helpers import randomize_bn
from timm_nam import NAMChannel, NAMSpatial
from timm_nam.layers import NormNAMMe

MODELS = [('resnet18_nam', None), ('resnet18_nam_sp', 64), ('mobilenetv2_100_nam', None), ('efficientnet_b0_nam', None)]
NAM_MODELS = sorted(n for n in timm.list_models(['*_nam', '*_nam_*']) if timm.get_pretrained_cfg(n) is not None)


def _model(name, img_size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **({} if img_size is None else dict(img_size=img_size)))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m)
    return model


def _gates(model):
    return [m for m in model.modules() if isinstance(m, (NAMChannel, NAMSpatial))]


def _live_norms(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize('name', NAM_MODELS)
def test_timms_freeze_leaves_no_live_batch_norm_in_any_nam_model(name):
    """timm's own freeze_batch_norm_2d reaches every gate (they sit beside the norm they follow, not in its
    activation slot), and a frozen model still trains its convolutions."""
    model = timm.create_model(name, num_classes=3)
    frozen = freeze_batch_norm_2d(model).train()
    assert not _live_norms(frozen) and all(isinstance(g.bn, FrozenBatchNorm2d) for g in _gates(frozen))
    size = timm.get_pretrained_cfg_value(name, 'input_size')[1:] if 'sp' in name else (64, 64)
    frozen(torch.randn(2, 3, *size)).sum().backward()
    assert all(p.grad is not None for n, p in frozen.named_parameters() if 'conv' in n)


@pytest.mark.parametrize('name,img_size', MODELS)
def test_frozen_model_trains_with_running_statistics(name, img_size):
    model = _model(name, img_size).eval()
    x = torch.randn(2, 3, img_size or 64, img_size or 64)
    expected = model(x)
    frozen = freeze_batch_norm_2d(copy.deepcopy(model)).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    out = frozen(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


@pytest.mark.parametrize('name,img_size', MODELS)
def test_unfrozen_model_trains_like_the_original(name, img_size):
    model = _model(name, img_size).train()
    thawed = unfreeze_batch_norm_2d(freeze_batch_norm_2d(copy.deepcopy(model))).train()
    assert not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in thawed.modules())
    assert [type(m) for m in thawed.modules() if isinstance(m, NormNAMMe)] == [
        type(m) for m in model.modules() if isinstance(m, NormNAMMe)
    ]
    x = torch.randn(4, 3, img_size or 64, img_size or 64)
    torch.testing.assert_close(thawed(x), model(x), rtol=1e-5, atol=1e-5)
    for a, b in zip(_gates(model), _gates(thawed), strict=True):
        torch.testing.assert_close(b.bn.running_mean, a.bn.running_mean)


@pytest.mark.parametrize('name,img_size', MODELS)
def test_reparameterized_model_is_unchanged_by_freezing(name, img_size):
    model = _model(name, img_size).eval()
    x = torch.randn(2, 3, img_size or 64, img_size or 64)
    expected = model(x)
    reparameterize_model(model, inplace=True)
    frozen = freeze_batch_norm_2d(model).train()
    assert not _gates(frozen)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['resnet18_nam', 'mobilenetv2_100_nam_chsp'])
def test_sync_batchnorm_converters_reach_every_gate(name):
    """timm's and torch's converters turn every gate's norm into torch's SyncBatchNorm, which then syncs NAM's batch
    statistics as any other norm's (torch runs it on GPUs only)."""
    for convert in (convert_sync_batchnorm, nn.SyncBatchNorm.convert_sync_batchnorm):
        model = convert(timm.create_model(name))
        assert all(isinstance(g.bn, nn.SyncBatchNorm) for g in _gates(model)) and _gates(model)


def test_frozen_gates_have_no_scale_to_penalize():
    from timm_nam import nam_scales

    model = _model('resnet18_nam', None)
    assert len(nam_scales(model)) == 8
    model.layer4 = freeze_batch_norm_2d(model.layer4)
    assert len(nam_scales(model)) == 6  # layer4's two gates are frozen: their γ is a buffer now
    assert all(isinstance(s, nn.Parameter) for s in nam_scales(model))
