"""The sparsity penalty is exact wherever training happens: the gradient of every NAM scale differs from the
criterion-only gradient by exactly p·sign(γ), every other gradient by nothing."""

import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.utils import ModelEmaV3, NativeScaler

import timm_nam
from timm_nam import NAMChannel, NAMSpatial
from timm_nam.penalty import (
    PAPER_PENALTY,
    NAMSparsityLoss,
    disable_penalty,
    enable_penalty,
    l1_penalty,
    nam_scales,
    paper_penalty,
    resolve_penalty,
)

P = 1e-2


class TinyNAMNet(nn.Module):
    """Backbone BNs (not penalized), a channel and a pixel NAM (penalized)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.nam_ch = NAMChannel(8)
        self.nam_sp = NAMSpatial(8, feat_size=6)
        self.fc = nn.Linear(8, 5)
        with torch.no_grad():  # mixed signs and a zero so sign() is exercised fully
            self.nam_ch.bn.weight.copy_(torch.tensor([0.5, -0.3, 0.0, 1.2, -2.0, 0.7, 0.1, -0.01]))
            self.nam_sp.bn.weight.uniform_(-1, 1)

    def forward(self, x):
        x = self.nam_sp(self.nam_ch(torch.relu(self.bn(self.conv(x)))))
        return self.fc(x.mean((2, 3)))


def _data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _assert_exact_penalty_grad(model, with_pen, without_pen, p=P, rtol=1e-6):
    scales = {id(s) for s in nam_scales(model)}
    for name, param in model.named_parameters():
        diff = with_pen[name] - without_pen[name]
        expected = p * torch.sign(param.detach()) if id(param) in scales else torch.zeros_like(diff)
        tol = rtol * max(1.0, float(without_pen[name].abs().max()))
        torch.testing.assert_close(diff, expected, atol=tol, rtol=0, msg=f'{name}')


def _backward(model, loss_fn, x, y, autocast_dtype=None, scaler=None, accum=1, grads_of=None):
    model.zero_grad(set_to_none=True)
    for xs, ys in zip(x.chunk(accum), y.chunk(accum)):
        with torch.autocast('cpu', dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = loss_fn(model(xs), ys) / accum
        (scaler.scale(loss) if scaler else loss).backward()
    if scaler:
        # unscale on a throwaway optimizer: grads become true gradients
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler.unscale_(opt)
    return _grads(grads_of or model)


def test_nam_scales_are_exactly_the_nam_bn_weights():
    model = TinyNAMNet()
    assert [id(s) for s in nam_scales(model)] == [id(model.nam_ch.bn.weight), id(model.nam_sp.bn.weight)]
    resnet = timm.create_model('resnet50_cifar_nam_chsp')
    assert len(nam_scales(resnet)) == 32
    assert len(nam_scales(timm.create_model('resnet50_cifar'))) == 0


def test_penalty_value_and_paper_defaults():
    model = TinyNAMNet()
    expected = P * (model.nam_ch.bn.weight.abs().sum() + model.nam_sp.bn.weight.abs().sum())
    torch.testing.assert_close(l1_penalty(nam_scales(model), P), expected)
    loss = NAMSparsityLoss(nn.CrossEntropyLoss(), model, P)
    x, y = _data()
    torch.testing.assert_close(loss(model(x), y), nn.CrossEntropyLoss()(model(x), y) + expected)
    assert NAMSparsityLoss(nn.CrossEntropyLoss(), timm.create_model('resnet50_cifar_nam')).p == 1e-4
    assert NAMSparsityLoss(nn.CrossEntropyLoss(), timm.create_model('mobilenetv2_100_nam')).p == 1e-3
    assert paper_penalty(timm.create_model('resnet18_nam')) == 1e-4
    assert NAMSparsityLoss(nn.CrossEntropyLoss(), TinyNAMNet()).p == 1e-4  # no depthwise convolution
    with pytest.raises(ValueError, match='has no NAM layers'):
        NAMSparsityLoss(nn.CrossEntropyLoss(), timm.create_model('resnet50_cifar'), 1e-4)
    with pytest.raises(ValueError, match='finite number >= 0'):
        NAMSparsityLoss(nn.CrossEntropyLoss(), model, -1.0)


@pytest.mark.parametrize(
    'arch,p',
    [
        ('resnext26ts', 1e-4),  # grouped, not depthwise
        ('regnety_002', 1e-4),
        ('cspdarknet53', 1e-4),
        ('dla34', 1e-4),
        ('mnasnet_small', 1e-3),
        ('mobilenetv4_conv_small', 1e-3),
        ('hgnetv2_b0', 1e-3),
    ],
)
def test_the_paper_penalty_follows_what_a_network_is_built_from(arch, p):
    """Any network NAM is added to has a default p: the paper's MobileNetV2 value where it has depthwise
    convolutions, its ResNet value otherwise, whatever the network's name."""
    model = timm_nam.add_nam(timm.create_model(arch))
    assert paper_penalty(model) == p
    assert NAMSparsityLoss(nn.CrossEntropyLoss(), model).p == p and timm_nam.enable_penalty(model) == p
    timm_nam.disable_penalty(model)


def test_loss_term_and_step_hook_are_the_same_gradient():
    x, y = _data()
    model = TinyNAMNet()
    g_loss = _backward(model, NAMSparsityLoss(nn.CrossEntropyLoss(), model, P), x, y)
    _backward(model, nn.CrossEntropyLoss(), x, y)  # leaves the criterion-only gradients in .grad
    enable_penalty(model, P)
    try:
        torch.optim.SGD(model.parameters(), lr=0.0).step()  # the hook adds p·sign(γ) before the (empty) step
    finally:
        disable_penalty(model)
    torch.testing.assert_close(_grads(model), g_loss, rtol=0, atol=1e-7)


def test_the_step_hook_goes_with_the_last_penalized_model():
    """Once no model is penalized (disabled, or garbage), no optimizer step pays for the hook."""
    import gc

    from timm_nam import penalty

    model, other = TinyNAMNet(), TinyNAMNet()
    enable_penalty(model, P)
    enable_penalty(other, P)
    assert penalty._hook is not None
    disable_penalty(model)
    assert penalty._hook is not None  # other still trains with it
    del other
    gc.collect()
    assert penalty._hook is None and not penalty._penalized
    enable_penalty(model, P)
    disable_penalty(model)
    assert penalty._hook is None


@pytest.mark.parametrize('setting', ['fp32', 'bf16_autocast', 'fp16_gradscaler', 'grad_accum', 'fp16_accum'])
def test_loss_wrapper_exact(setting):
    x, y = _data(8)
    kw = dict(
        fp32={},
        bf16_autocast=dict(autocast_dtype=torch.bfloat16),
        fp16_gradscaler=dict(autocast_dtype=torch.float16),
        grad_accum=dict(accum=4),
        fp16_accum=dict(autocast_dtype=torch.float16, accum=2),
    )[setting]
    model = TinyNAMNet()
    results = []
    for loss_fn in (NAMSparsityLoss(nn.CrossEntropyLoss(), model, P), nn.CrossEntropyLoss()):
        scaler = torch.amp.GradScaler('cpu', init_scale=2.0**16) if kw.get('autocast_dtype') == torch.float16 else None
        torch.manual_seed(0)
        results.append(_backward(model, loss_fn, x, y, scaler=scaler, **kw))
    _assert_exact_penalty_grad(model, *results)


def test_loss_wrapper_through_compile_and_with_ema():
    x, y = _data()
    model = TinyNAMNet()
    ema = ModelEmaV3(model, decay=0.9)
    compiled = torch.compile(model, backend='aot_eager')
    loss_fn = NAMSparsityLoss(nn.CrossEntropyLoss(), compiled, P)
    assert len(loss_fn._scales) == 2 and loss_fn._scales[0] is model.nam_ch.bn.weight
    g_pen = _backward(compiled, loss_fn, x, y, grads_of=model)
    g_plain = _backward(compiled, nn.CrossEntropyLoss(), x, y, grads_of=model)
    _assert_exact_penalty_grad(model, g_pen, g_plain)
    with pytest.raises(TypeError, match='not its EMA copy'):
        NAMSparsityLoss(nn.CrossEntropyLoss(), ema, P)


def _step_grads(model, x, y, *, amp_dtype=None, accum=1):
    """Gradients as optimizer.step() sees them, in a timm-style loop (timm's NativeScaler, accumulation)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    seen = {}
    opt.register_step_pre_hook(lambda o, a, k: seen.update(_grads(model)))
    scaler = NativeScaler(device='cpu') if amp_dtype == torch.float16 else None
    model.zero_grad(set_to_none=True)
    crit = nn.CrossEntropyLoss()
    for i, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
        with torch.autocast('cpu', dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = crit(model(xs), ys) / accum
        last = i == accum - 1
        if scaler is not None:
            scaler(loss, opt, parameters=model.parameters(), need_update=last)
        else:
            loss.backward()
            if last:
                opt.step()
    return seen


@pytest.mark.parametrize('amp_dtype,accum', [(None, 1), (torch.bfloat16, 1), (torch.float16, 1), (torch.float16, 4)])
def test_step_hook_exact_in_a_timm_style_loop(amp_dtype, accum):
    x, y = _data(8)
    model = TinyNAMNet()
    torch.manual_seed(0)
    g_plain = _step_grads(model, x, y, amp_dtype=amp_dtype, accum=accum)
    assert enable_penalty(model, P) == P
    try:
        torch.manual_seed(0)
        g_pen = _step_grads(model, x, y, amp_dtype=amp_dtype, accum=accum)
    finally:
        disable_penalty(model)
    _assert_exact_penalty_grad(model, g_pen, g_plain)


def test_step_hook_skipped_on_inf_steps():
    """GradScaler skips ``optimizer.step()`` when any gradient is not finite; the hook, a step pre-hook, then does
    not run: the γ gradient is left as the backward pass made it."""
    x, y = _data()
    model = TinyNAMNet()
    enable_penalty(model, P)
    try:
        added = {}
        for poisoned in (False, True):
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            scaler = torch.amp.GradScaler('cpu', init_scale=1.0)  # unscaling divides by 1: gradients keep their values
            model.zero_grad(set_to_none=True)
            scaler.scale(nn.CrossEntropyLoss()(model(x), y)).backward()
            if poisoned:  # one non-finite gradient anywhere makes GradScaler skip the step
                model.fc.bias.grad[0] = float('inf')
            gamma_grad = model.nam_ch.bn.weight.grad.clone()
            scaler.step(opt)
            added[poisoned] = model.nam_ch.bn.weight.grad - gamma_grad
        torch.testing.assert_close(added[False], P * torch.sign(model.nam_ch.bn.weight.detach()))  # a step: once
        assert torch.equal(added[True], torch.zeros_like(added[True]))  # a skipped step: not at all
    finally:
        disable_penalty(model)


def test_model_kwarg_applies_the_penalty_at_the_step():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
    grads = {}
    for kwargs in ({}, {'nam_penalty': 'paper'}):
        torch.manual_seed(0)
        model = timm.create_model('resnet18_nam', num_classes=5, **kwargs)
        try:
            grads[bool(kwargs)] = _step_grads(model, x, y)
        finally:
            disable_penalty(model)
    _assert_exact_penalty_grad(model, grads[True], grads[False], p=PAPER_PENALTY['resnet'])
    with pytest.raises(ValueError, match="penalty p must be 'paper' or a finite number >= 0, got nan"):
        timm.create_model('resnet50_cifar_nam', nam_penalty=float('nan'))


def test_one_rule_decides_p():
    model = timm.create_model('resnet18_nam')
    assert resolve_penalty(model) == resolve_penalty(model, 'paper') == resolve_penalty(model, model_kwarg='paper')
    assert resolve_penalty(model) == 1e-4
    assert resolve_penalty(model, '5e-1') == resolve_penalty(model, model_kwarg=0.5) == 0.5
    assert resolve_penalty(model, 0.5, model_kwarg='0.5') == 0.5  # both given: they must agree
    with pytest.raises(ValueError, match='two different penalties asked for: p = 0.001 and the model kwarg'):
        resolve_penalty(model, 1e-3, model_kwarg=1e-2)
    baseline = timm.create_model('resnet18')
    assert resolve_penalty(baseline) == resolve_penalty(baseline, 'paper') == resolve_penalty(baseline, 0) == 0.0
    with pytest.raises(ValueError, match='resnet18 has no NAM layers to penalize'):
        resolve_penalty(baseline, 1e-3)


@pytest.mark.parametrize('bad', ['abc', -1.0, float('nan'), 'inf'])
def test_every_way_to_ask_for_p_accepts_the_same_values(bad):
    from timm_nam import penalty

    message = f"penalty p must be 'paper' or a finite number >= 0, got {bad!r}"
    model = TinyNAMNet()
    for ask in (
        lambda: resolve_penalty(model, bad),
        lambda: NAMSparsityLoss(nn.CrossEntropyLoss(), model, bad),
        lambda: enable_penalty(model, bad),
        lambda: timm.create_model('resnet18_nam', nam_penalty=bad),
    ):
        with pytest.raises(ValueError) as e:
            ask()
        assert str(e.value) == message
    assert model.nam_ch.bn.weight not in penalty._penalized  # nothing was half-enabled


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, use_hook, queue):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    torch.manual_seed(0)
    x, y = _data(8)
    xs, ys = x.chunk(world_size)[rank], y.chunk(world_size)[rank]
    out = {}
    for with_penalty in (False, True):
        torch.manual_seed(0)
        model = TinyNAMNet()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        seen = {}
        opt.register_step_pre_hook(lambda o, a, k: seen.update(_grads(model)))
        crit = nn.CrossEntropyLoss()
        if with_penalty and use_hook:
            enable_penalty(model, P)
        loss_fn = NAMSparsityLoss(crit, ddp, P) if with_penalty and not use_hook else crit
        loss_fn(ddp(xs), ys).backward()
        opt.step()
        out[with_penalty] = seen
    if rank == 0:
        queue.put({k: {n: t.numpy() for n, t in v.items()} for k, v in out.items()})
    dist.destroy_process_group()


@pytest.mark.parametrize('use_hook', [False, True])
def test_exact_under_ddp(use_hook):
    ctx = mp.get_context('spawn')
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, _free_port(), use_hook, queue), nprocs=2, join=True, start_method='spawn')
    out = queue.get(timeout=60)
    g_plain = {n: torch.from_numpy(a) for n, a in out[False].items()}
    g_pen = {n: torch.from_numpy(a) for n, a in out[True].items()}
    _assert_exact_penalty_grad(TinyNAMNet(), g_pen, g_plain)


def test_public_names():
    """``from timm_nam import *`` gives every name of ``__all__``, each resolving to a real object."""
    import timm_nam
    import timm_nam.convert

    names = {}
    exec('from timm_nam import *', names)
    assert set(timm_nam.__all__) <= set(names) and all(names[n] is not None for n in timm_nam.__all__)
    assert timm_nam.NAMSparsityLoss is NAMSparsityLoss
    assert timm_nam.add_nam is timm_nam.convert.add_nam and timm_nam.load_plain_weights is not None
    with pytest.raises(AttributeError):
        timm_nam.no_such_name  # noqa: B018  (the attribute access is what is tested)
