"""The gate measurements and the pruning evaluation of results/nam_gates/ (lab/gate_stats.py and
lab/prune_eval.py) compute what they say they compute."""

import pytest
import timm
import torch
import torch.nn as nn

import timm_nam  # noqa: F401  (registers the models)
from tests.helpers import load_script, randomize_bn
from timm_nam.layers import NAMChannel

gate_stats = load_script('gate_stats')
prune_eval = load_script('prune_eval')


def _small_nam(weighting='sum'):
    torch.manual_seed(0)
    model = timm.create_model('resnet18_nam', num_classes=3, nam_weighting=weighting).eval()
    for m in model.modules():
        if isinstance(m, NAMChannel):
            randomize_bn(m.bn)
    return model


@pytest.mark.parametrize('weighting', ['sum', 'mean'])
def test_gate_stats_reports_the_sigmoid_of_w_times_bn(weighting):
    """The gate values and slopes are those of sigmoid(w·BN(x)), computed here from the layer's batch norm."""
    model = _small_nam(weighting)
    inputs = {}
    for name, m in model.named_modules():
        if isinstance(m, NAMChannel):
            m.register_forward_hook(lambda mod, inp, out, name=name: inputs.__setitem__(name, inp[0]))
    x = torch.randn(2, 3, 32, 32)
    rows = gate_stats.layer_stats('run', model, x)
    assert [r['layer'] for r in rows] == list(inputs)
    layers = dict(model.named_modules())
    with torch.no_grad():
        for r in rows:
            m = layers[r['layer']]
            w = m.bn.weight.abs() / m.bn.weight.abs().sum()
            if weighting == 'mean':
                w = w * w.numel()
            gate = torch.sigmoid(w.view(1, -1, 1, 1) * m.bn(inputs[r['layer']]))
            assert r['width'] == m.bn.weight.numel()
            assert r['gate_min'] == pytest.approx(gate.min().item(), abs=1e-5)
            assert r['gate_max'] == pytest.approx(gate.max().item(), abs=1e-5)
            assert r['w_gamma_median'] == pytest.approx((w * m.bn.weight).abs().median().item(), rel=1e-5)
            assert r['moved'] == pytest.approx(((gate - 0.5).abs() > 0.1).float().mean().item(), abs=1e-6)


def test_smallest_masks_zero_the_smallest_scales():
    model = _small_nam()
    masks = prune_eval.channel_masks(model, 0.3, 'smallest')
    layers = dict(model.named_modules())
    assert set(masks) == {n for n, m in layers.items() if isinstance(m, NAMChannel)}
    for name, mask in masks.items():
        scale = layers[name].bn.weight.detach().abs()
        k = round(0.3 * scale.numel())
        assert int((mask == 0).sum()) == k
        assert scale[mask == 0].max() <= scale[mask == 1].min()


@pytest.mark.parametrize('name', ['resnet18_nam', 'mobilenetv2_nam'])
def test_gated_norms_find_the_norm_before_each_gate(name):
    model = timm.create_model(name, num_classes=3)
    modules = dict(model.named_modules())

    def norm_of(gate_path):  # '<block>.bn2.nam' -> '<block>.bn2.norm'
        return gate_path.rsplit('.', 1)[0] + '.norm'

    norms = prune_eval.gated_norms(model)
    gates = [n for n, m in modules.items() if isinstance(m, NAMChannel)]
    assert sorted(norms) == sorted(gates)
    assert all(norms[g] is modules[norm_of(g)] for g in gates)
    with torch.no_grad():  # the norm's smallest scales last, the gate's first: 'norm' must follow the norm
        for g in gates:
            c = modules[g].bn.weight.numel()
            modules[norm_of(g)].weight.copy_(torch.linspace(2, 1, c))
            modules[g].bn.weight.copy_(torch.linspace(1, 2, c))
    for mask in prune_eval.channel_masks(model, 0.25, 'norm', norms=norms).values():
        k = round(0.25 * mask.numel())
        assert torch.equal(mask[-k:], torch.zeros(k)) and bool(mask[:-k].all())
    rows = prune_eval.layer_scales('run', model, norms)
    assert [r['layer'] for r in rows] == gates
    for r in rows:
        assert (r['gamma_min'], r['gamma_max']) == (1.0, 2.0)
        assert 1.45 < r['norm_gamma_median'] <= 1.5  # linspace(2, 1, C): the middle value (the lower one for even C)
        assert r['corr_gamma_norm_gamma'] == pytest.approx(-1.0, abs=1e-3)  # opposite orders
        assert r['norm_gamma_below_0.05'] == 0.0


def test_random_masks_follow_the_generator():
    model = _small_nam()
    draw = lambda seed: prune_eval.channel_masks(model, 0.5, 'random', torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    assert all(int((m == 0).sum()) == round(0.5 * m.numel()) for m in a.values())


def test_pruned_zeroes_the_masked_output_channels_only_inside_the_block():
    gate = NAMChannel(6).eval()
    randomize_bn(gate.bn)
    model = nn.Sequential(gate)
    x = torch.randn(2, 6, 4, 4)
    mask = torch.tensor([1.0, 0, 1, 1, 0, 1])
    with torch.no_grad():
        full = model(x)
        with prune_eval.pruned(model, {'0': mask}):
            cut = model(x)
        after = model(x)
    assert torch.equal(cut, full * mask.view(1, -1, 1, 1))
    assert torch.equal(cut[:, [1, 4]], torch.zeros(2, 2, 4, 4))
    assert torch.equal(after, full)


def test_mask_errors_name_the_problem():
    model = _small_nam()
    with pytest.raises(ValueError, match='fraction must be in'):
        prune_eval.channel_masks(model, 1.5, 'smallest')
    with pytest.raises(ValueError, match='order must be one of'):
        prune_eval.channel_masks(model, 0.1, 'largest')
    with pytest.raises(ValueError, match='needs the gated norms'):
        prune_eval.channel_masks(model, 0.1, 'norm')
    with pytest.raises(ValueError, match='no NAM channel gates'):
        prune_eval.channel_masks(timm.create_model('resnet18', num_classes=3), 0.1, 'smallest')


penalty_pull = load_script('penalty_pull')


def test_penalty_pull_without_momentum_is_lr_times_p_per_step():
    from lab.trainer.recipes import get_recipe

    constant = get_recipe(
        'imagenet', epochs=3, lr=0.1, opt='momentum', momentum=0.0, sched='multistep', warmup_epochs=0
    )
    assert penalty_pull.penalty_only_scale(constant, 20, 0.0) == 1.0
    assert penalty_pull.penalty_only_scale(constant, 20, 1e-3) == pytest.approx(1 - 60 * 0.1 * 1e-3, abs=1e-6)
    # momentum 0.9 carries each push on: a constant gradient moves a weight close to 1/(1 - 0.9) times as far
    heavy = get_recipe('imagenet', epochs=3, lr=0.1, momentum=0.9, sched='multistep', warmup_epochs=0)
    ratio = (1 - penalty_pull.penalty_only_scale(heavy, 20, 1e-3)) / (60 * 0.1 * 1e-3)
    assert 8 < ratio < 10


def test_penalty_pull_of_the_study_recipe_matches_its_trained_scales():
    """The ResNet-18 study recipe with the paper's p = 1e-4 leaves a scale at 0.967: what the trained models show."""
    from lab.trainer.recipes import get_recipe

    recipe = get_recipe(
        'imagenet', img_size=64, batch_size=64, epochs=10, warmup_epochs=1, sched_on_updates=True, lr=0.05
    )
    assert penalty_pull.penalty_only_scale(recipe, 147, 1e-4) == pytest.approx(0.9669, abs=2e-4)


def test_gate_start_compares_each_gate_with_the_start_the_conversion_gave_it(tmp_path):
    """lab.gate_start rebuilds the run's start (its plain weights converted) and reports, per gate, the scales at the
    end against that start: their ratios, the share grown and the share near 0."""
    from safetensors.torch import save_file

    gate_start = load_script('gate_start')
    from tests.helpers import write_train_py_run

    plain = tmp_path / 'plain.safetensors'
    save_file(timm.create_model('resnet18').state_dict(), str(plain))
    kwargs = {'pretrained_cfg_overlay': {'file': str(plain)}, 'nam_penalty': 'paper'}
    model = timm.create_model('resnet18_nam', pretrained=True, num_classes=3, **kwargs)
    gates = [m for m in model.modules() if isinstance(m, NAMChannel)]
    with torch.no_grad():  # first gate: half its scales doubled, a quarter at 0; the others untouched
        scales = gates[0].bn.weight
        scales[: len(scales) // 2] *= 2
        scales[-len(scales) // 4 :] = 0
    run = write_train_py_run(
        tmp_path / 'run', model, dict(model='resnet18_nam', num_classes=3, model_kwargs=kwargs), top1=[50.0]
    )
    rows = gate_start.gate_rows(run)
    assert len(rows) == len(gates) == 8 and rows[0]['gate'] == 'layer1.0.bn2.nam' and rows[0]['width'] == 64
    assert rows[0]['start'] == pytest.approx(0.25)  # 64 channels: the slope bound lowers 0.5 to 64/256
    assert rows[0]['grew'] == 0.5 and rows[0]['near_zero'] == 0.25 and rows[0]['max_ratio'] == 2.0
    assert all(r['median_ratio'] == 1.0 and r['grew'] == 0 and r['near_zero'] == 0 for r in rows[1:])
