"""timm's batch-norm utilities on NAM layers and models: freezing, unfreezing, syncing, reparameterizing."""

import copy
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.layers import convert_sync_batchnorm
from timm.layers import freeze_batch_norm_2d as timm_freeze
from timm.layers.norm_act import FrozenBatchNorm2d, FrozenBatchNormAct2d

from tests.helpers import randomize_bn, spatial_reference
from timm_nam import NAMChannel, NAMSpatial
from timm_nam.layers import BatchNormAct2dForNAM, freeze_batch_norm_2d, unfreeze_batch_norm_2d

MODELS = [('resnet18_nam', None), ('resnet18_nam_sp', 64), ('mobilenetv2_100_nam', None)]


def _model(name, img_size):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **({} if img_size is None else dict(img_size=img_size)))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            randomize_bn(m)
    return model


def _gates(model):
    return [m for m in model.modules() if isinstance(m, (NAMChannel, NAMSpatial))]


@pytest.mark.parametrize('name,img_size', MODELS)
def test_frozen_model_trains_with_running_statistics(name, img_size):
    model = _model(name, img_size).eval()
    x = torch.randn(2, 3, img_size or 64, img_size or 64)
    expected = model(x)
    frozen = freeze_batch_norm_2d(copy.deepcopy(model)).train()
    assert all(isinstance(g.bn, FrozenBatchNorm2d) for g in _gates(frozen))
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    out = frozen(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()  # the frozen gate still passes gradients to the convolutions before it
    assert all(p.grad is not None for n, p in frozen.named_parameters() if 'conv' in n)
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())


@pytest.mark.parametrize('name,img_size', MODELS[:2])
def test_timms_own_freeze_reaches_resnet_gates(name, img_size):
    model = _model(name, img_size).eval()
    x = torch.randn(2, 3, img_size or 64, img_size or 64)
    frozen = timm_freeze(copy.deepcopy(model)).train()
    assert all(isinstance(g.bn, FrozenBatchNorm2d) for g in _gates(frozen))
    torch.testing.assert_close(frozen(x), model(x), rtol=1e-5, atol=1e-5)


def test_timms_freeze_misses_gates_in_activation_slots_and_ours_does_not():
    model = _model('mobilenetv2_100_nam', None)
    assert not all(isinstance(g.bn, FrozenBatchNorm2d) for g in _gates(timm_freeze(copy.deepcopy(model))))
    frozen = freeze_batch_norm_2d(copy.deepcopy(model))
    assert isinstance(frozen.blocks[1][0].bn3, FrozenBatchNormAct2d)
    assert all(isinstance(g.bn, FrozenBatchNorm2d) for g in _gates(frozen))


@pytest.mark.parametrize('name,img_size', MODELS)
def test_unfrozen_model_trains_like_the_original(name, img_size):
    model = _model(name, img_size).train()
    thawed = unfreeze_batch_norm_2d(freeze_batch_norm_2d(copy.deepcopy(model))).train()
    assert not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in thawed.modules())
    if name.startswith('mobilenetv2'):
        assert isinstance(thawed.blocks[1][0].bn3, BatchNormAct2dForNAM)
    x = torch.randn(4, 3, img_size or 64, img_size or 64)
    torch.testing.assert_close(thawed(x), model(x), rtol=1e-5, atol=1e-5)
    gates, thawed_gates = _gates(model), _gates(thawed)
    for a, b in zip(gates, thawed_gates, strict=True):
        torch.testing.assert_close(b.bn.running_mean, a.bn.running_mean)


@pytest.mark.parametrize('name,img_size', MODELS)
def test_reparameterized_model_is_unchanged_by_freezing(name, img_size):
    model = _model(name, img_size).eval()
    x = torch.randn(2, 3, img_size or 64, img_size or 64)
    expected = model(x)
    model.reparameterize()
    frozen = freeze_batch_norm_2d(model).train()
    assert not _gates(frozen)
    torch.testing.assert_close(frozen(x), expected, rtol=1e-5, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _sync_worker(rank, world_size, port, converter, x, grad_out, queue):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.manual_seed(0)
    layer = NAMSpatial(6, feat_size=(3, 4)).double().train()
    randomize_bn(layer.bn)
    layer = (convert_sync_batchnorm if converter == 'timm' else nn.SyncBatchNorm.convert_sync_batchnorm)(layer)
    assert isinstance(layer.bn, nn.SyncBatchNorm)
    xs = x.chunk(world_size)[rank].clone().requires_grad_(True)
    out = layer(xs)
    out.backward(grad_out.chunk(world_size)[rank])
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)  # what DDP does with the parameter gradients (as a sum)
    arrays = [out.detach(), xs.grad, layer.bn.running_mean, layer.bn.running_var]
    queue.put((rank, *(a.numpy() for a in arrays), {n: g.numpy() for n, g in grads.items()}))
    dist.destroy_process_group()


@pytest.mark.parametrize('converter', ['timm', 'torch'])
def test_synced_pixel_attention_equals_one_process_on_the_whole_batch(converter):
    torch.manual_seed(1)
    x = torch.randn(6, 6, 3, 4, dtype=torch.float64)
    grad_out = torch.randn_like(x)
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    mp.start_processes(
        _sync_worker, args=(2, _free_port(), converter, x, grad_out, queue), nprocs=2, join=True, start_method='spawn'
    )
    results = {}
    for _ in range(2):
        rank, out_r, grad_x, running_mean, running_var, grads = queue.get(timeout=60)
        results[rank] = dict(
            out=torch.from_numpy(out_r),
            grad_x=torch.from_numpy(grad_x),
            running_mean=torch.from_numpy(running_mean),
            running_var=torch.from_numpy(running_var),
            grads={n: torch.from_numpy(g) for n, g in grads.items()},
        )

    torch.manual_seed(0)
    layer = NAMSpatial(6, feat_size=(3, 4)).double().train()
    randomize_bn(layer.bn)
    ref_bn = nn.BatchNorm1d(12).double()
    ref_bn.load_state_dict(layer.bn.state_dict())
    xr = x.clone().requires_grad_(True)
    out = layer(xr)
    out.backward(grad_out)
    # the layer on the whole batch is the authors' formula (tested elsewhere); here the two processes must equal it
    torch.testing.assert_close(out, spatial_reference(ref_bn, x.clone()))
    torch.testing.assert_close(torch.cat([results[r]['out'] for r in (0, 1)]), out.detach())
    torch.testing.assert_close(torch.cat([results[r]['grad_x'] for r in (0, 1)]), xr.grad)
    for r in (0, 1):
        for name, p in layer.named_parameters():
            torch.testing.assert_close(results[r]['grads'][name], p.grad)
        torch.testing.assert_close(results[r]['running_mean'], layer.bn.running_mean)
        torch.testing.assert_close(results[r]['running_var'], layer.bn.running_var)


def test_frozen_gates_have_no_scale_to_penalize():
    from timm_nam import nam_scales

    model = _model('resnet18_nam', None)
    assert len(nam_scales(model)) == 8
    model.layer4 = freeze_batch_norm_2d(model.layer4)
    assert len(nam_scales(model)) == 6  # layer4's two gates are frozen: their γ is a buffer now
    assert all(isinstance(s, nn.Parameter) for s in nam_scales(model))
