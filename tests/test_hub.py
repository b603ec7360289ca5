"""Hub form: export of a train.py run, model card, publish --dry-run, and pretrained=True through timm's real hub
loader, offline."""

import json
import os
import re
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

from tests.helpers import (
    hf_cache_snapshot,
    make_image_folder,
    offline_hub_env,
    randomize_bn,
    write_train_py_run,
)
from timm_nam.hub import export_run, publish, upload_plan
from timm_nam.models import MODEL_MODULES
from timm_nam.models._cfg import HF_ORG, PLAIN_TAG_PREFIX, hub_id

TAG_MODEL, TAG = 'mobilenetv2_100_nam_chsp', 'imagenette_r64'  # the staged release (hub_configs/)
REPO = hub_id(TAG_MODEL, TAG)
REVISION = 'a' * 40
TOP1 = [31.5, 42.25, 40.0]  # per epoch: the best is the second
ARGS = dict(  # train.py's args.yaml, the keys the export reads
    model=TAG_MODEL,
    num_classes=10,
    img_size=64,
    input_size=None,
    epochs=3,
    batch_size=32,
    opt='sgd',
    momentum=0.9,
    lr=0.05,
    weight_decay=4e-5,
    sched='cosine',
    warmup_epochs=1,
    smoothing=0.1,
    seed=42,
    amp=False,
    model_ema=False,
    model_kwargs={'nam_penalty': 0.001},
)


@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
    """The output directory of a train.py run of the staged model (10 classes, 64 px), as train.py writes it."""
    root = tmp_path_factory.mktemp('hub')
    data = make_image_folder(root / 'data', classes=10, per_class=1, size=64)
    torch.manual_seed(0)
    model = timm.create_model(TAG_MODEL, img_size=64, num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            randomize_bn(m)
    return write_train_py_run(root / 'run', model, dict(ARGS, data_dir=str(data)), TOP1)


@pytest.fixture(scope='module')
def exported(trained_run):
    """That run exported for the declared tag."""
    return export_run(trained_run, trained_run.parent / 'export', tag=TAG, dataset_name='Imagenette')


def _hf_cache(
    tmp_path: Path, export: Path, weights: bytes = None, org_repo: str = REPO, with_weights: bool = True
) -> Path:
    """Lay ``export`` out as huggingface_hub's cache: models--ORG--NAME/refs/main + snapshots/<rev>/..."""
    cache = tmp_path / 'hf_cache'
    snap = hf_cache_snapshot(cache, org_repo, REVISION)
    (snap / 'config.json').write_bytes((export / 'config.json').read_bytes())
    if with_weights:
        (snap / 'model.safetensors').write_bytes(
            weights if weights is not None else (export / 'model.safetensors').read_bytes()
        )
    return cache


def _offline(code: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=offline_hub_env(cache),
        timeout=300,
    )


def _reference(export: Path, x: torch.Tensor) -> torch.Tensor:
    model = timm.create_model(TAG_MODEL, img_size=64, num_classes=10).eval()
    model.load_state_dict(load_file(str(export / 'model.safetensors')))
    with torch.no_grad():
        return model(x)


def test_export_layout_and_card(exported, trained_run):
    assert sorted(p.name for p in exported.iterdir()) == [
        'README.md',
        'args.yaml',
        'config.json',
        'model.safetensors',
        'summary.csv',
    ]
    assert (exported / 'args.yaml').read_bytes() == (trained_run / 'args.yaml').read_bytes()
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == TAG_MODEL and config['num_classes'] == 10
    assert config['model_args']['img_size'] == [64, 64]
    assert config['pretrained_cfg']['hf_hub_id'] == REPO and config['pretrained_cfg']['input_size'] == [3, 64, 64]
    assert 'notes' not in config['pretrained_cfg']  # the plain weights' note is not this export's
    assert config['label_names'] == [f'class{i}' for i in range(10)]
    card = ModelCard.load(exported / 'README.md')
    meta = card.data.to_dict()
    model_index = meta.pop('model-index')
    assert meta == {
        'library_name': 'timm',
        'license': 'apache-2.0',
        'pipeline_tag': 'image-classification',
        'tags': ['image-classification', 'timm', 'timm-nam', 'nam', 'attention'],
        'datasets': ['imagenette'],
        'metrics': ['accuracy'],
    }
    # the directory stands for model_best.pth.tar: the second epoch's accuracy is reported
    accuracy = [{'type': 'accuracy', 'name': 'top-1 accuracy', 'value': 42.25}]
    accuracy.append({'type': 'accuracy', 'name': 'top-5 accuracy', 'value': 62.25})
    assert model_index == [
        {
            'name': f'{TAG_MODEL}.{TAG}',
            'results': [
                {
                    'task': {'type': 'image-classification'},
                    'dataset': {'name': 'Imagenette', 'type': 'imagenette'},
                    'metrics': accuracy,
                }
            ],
        }
    ]
    lines = card.text.splitlines()
    assert lines[0] == f'# Model card for {TAG_MODEL}.{TAG}'
    assert f"model = timm.create_model('hf-hub:{REPO}', pretrained=True).eval()" in lines
    text = ' '.join(lines)
    assert (
        'epochs 3, batch 32, opt sgd (momentum 0.9), lr 0.05, weight decay 4e-05, schedule cosine (warmup 1 epochs), '
        'label smoothing 0.1, seed 42, AMP False, EMA False; NAM sparsity penalty p = 0.001'
    ) in text
    assert '- **Weights file:** from `model_best.pth.tar`' in lines
    assert (
        '| these weights | 2 | 42.25 | 62.25 | 1.4000 |' in lines
        and '| final epoch | 3 | 40.00 | 60.00 | 1.3000 |' in lines
    )


def test_export_records_the_input_size_the_run_trained_at(tmp_path):
    """A model that takes any input size, trained at another size than its cfg's: the export says that size."""
    run = write_train_py_run(
        tmp_path / 'run',
        timm.create_model('resnet18_nam', num_classes=3),
        dict(ARGS, model='resnet18_nam', num_classes=3, img_size=48),
        [10.0],
    )
    config = json.loads((export_run(run, tmp_path / 'export', tag='t') / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 48, 48] and 'img_size' not in config.get('model_args', {})
    run = write_train_py_run(
        tmp_path / 'run2',
        timm.create_model('resnet18_nam', num_classes=3),
        dict(ARGS, model='resnet18_nam', num_classes=3, img_size=None, input_size=[3, 40, 56]),
        [10.0],
    )
    config = json.loads((export_run(run, tmp_path / 'export2', tag='t') / 'config.json').read_text())
    assert config['pretrained_cfg']['input_size'] == [3, 40, 56]


def test_an_export_of_the_model_nam_builds_the_same_network_again(tmp_path):
    """The model 'nam' with a base and NAM options: the export's config.json names the architecture 'nam' and records
    the base and options (with every supported timm: before 1.0.31 timm recorded none), so ``local-dir:`` builds the
    same network with the same outputs; the penalty and the weights' source are not the network's."""
    kwargs = dict(base='regnety_002', weighting='mean', blocks_without_skip=True)
    model = timm.create_model('nam', num_classes=3, **kwargs)
    overlay = dict(file='/elsewhere/regnety_002.safetensors')
    args = dict(
        ARGS, model='nam', num_classes=3, model_kwargs=dict(kwargs, nam_penalty='paper', pretrained_cfg_overlay=overlay)
    )
    out = export_run(write_train_py_run(tmp_path / 'run', model, args, [10.0]), tmp_path / 'export', tag='t')
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'nam' and config['pretrained_cfg']['hf_hub_id'] == 'timm-nam/regnety_002_nam.t'
    assert {k: config['model_args'][k] for k in kwargs} == kwargs
    assert not {'nam_penalty', 'pretrained_cfg_overlay'} & set(config['model_args'])
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def _modes(folder: Path) -> dict:
    return {f.name: stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()}


def test_export_cli_writes_the_export_with_one_file_mode(trained_run, exported, tmp_path):
    out = tmp_path / 'export'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'export', str(trained_run), str(out), '--tag', TAG]
        + ['--dataset-name', 'Imagenette'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in exported.iterdir())
    for f in exported.iterdir():
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
        assert f'{out / f.name}  ({f.stat().st_size:,} bytes)' in proc.stdout
    # the weights are as readable as the rest: what the umask gives a new file
    probe = tmp_path / 'probe'
    probe.write_text('')
    assert set(_modes(out).values()) == set(_modes(exported).values()) == {stat.S_IMODE(probe.stat().st_mode)}


def test_the_wheel_is_the_plugin():
    """What pip installs holds no trainer or study code: those live in the repository's lab/, run from a checkout."""
    from importlib.metadata import distribution

    files = [str(f) for f in distribution('timm-nam').files or ()]
    assert not [f for f in files if f.startswith(('timm_nam/training', 'lab/'))]
    code = (
        'import sys, timm_nam.hub, timm_nam.cli\n'
        "print(sorted(m for m in sys.modules if m.startswith(('lab', 'timm_nam.training'))))"
    )
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'


def test_pretrained_true_reports_only_loading_errors_as_such(tmp_path):
    model = timm.create_model('resnet18_nam', num_classes=3)
    weights = tmp_path / 'w.safetensors'
    save_file(model.state_dict(), str(weights))
    kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), num_classes=3), num_classes=3)
    loaded = timm.create_model('resnet18_nam', **kwargs)
    assert torch.equal(loaded.fc.weight, model.fc.weight)
    # a bad kwarg is the caller's mistake, named as such, not the weights'
    with pytest.raises(TypeError, match="unexpected keyword argument 'no_such_kwarg'"):
        timm.create_model('resnet18_nam', **kwargs, no_such_kwarg=1)
    weights.write_bytes(weights.read_bytes()[:1000])
    message = re.escape(f'Could not load pretrained weights for resnet18_nam (plain_a1_in1k tag) from {weights}: ')
    with pytest.raises(RuntimeError, match=message):
        timm.create_model('resnet18_nam', **kwargs)


def test_pretrained_true_offline_through_timm_hub_loader(exported, tmp_path):
    names = [f'hf-hub:{REPO}', f'local-dir:{exported}']
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / 'x.pt')
    expected = _reference(exported, x)
    cache = _hf_cache(tmp_path, exported)
    proc = _offline(
        f"""
        import json, torch, timm
        x = torch.load({str(tmp_path / 'x.pt')!r}, weights_only=True)
        outs = {{}}
        for name in {names!r}:
            m = timm.create_model(name, pretrained=True).eval()
            with torch.no_grad():
                outs[name] = m(x).tolist()
        head = timm.create_model('hf-hub:{REPO}', pretrained=True, num_classes=3).eval()
        ref = timm.create_model('hf-hub:{REPO}', pretrained=True).eval()
        with torch.no_grad():
            diff = (head.forward_features(x) - ref.forward_features(x)).abs().max().item()
            outs['head'] = [list(head(x).shape), diff]
        print(json.dumps(outs))
    """,
        cache,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        torch.testing.assert_close(torch.tensor(outs[name]), expected, msg=name)
    assert outs['head'] == [[2, 3], 0.0]


@pytest.mark.parametrize(
    'damage,message',
    [
        ('truncate', f'Could not load pretrained weights for {TAG_MODEL}'),
        ('rename', f'Could not load pretrained weights for {TAG_MODEL}'),
        ('reshape', 'size mismatch'),
    ],
)
def test_corrupt_weights_give_clear_errors(exported, tmp_path, damage, message):
    raw = (exported / 'model.safetensors').read_bytes()
    if damage == 'truncate':
        weights = raw[: len(raw) // 2]
        detail = 'safetensors'
    else:
        state = load_file(str(exported / 'model.safetensors'))
        if damage == 'rename':
            state['blocks.0.0.conv_dw.weight_renamed'] = state.pop('blocks.0.0.conv_dw.weight')
            detail = 'blocks.0.0.conv_dw.weight'
        else:
            state['classifier.weight'] = torch.zeros(11, 1280)
            detail = 'classifier.weight'
        save_file(state, str(tmp_path / 'w.safetensors'))
        weights = (tmp_path / 'w.safetensors').read_bytes()
    cache = _hf_cache(tmp_path, exported, weights=weights)
    proc = _offline(f"import timm; timm.create_model('hf-hub:{REPO}', pretrained=True)", cache)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert detail in (proc.stderr.lower() if damage == 'truncate' else proc.stderr)


def test_missing_weights_offline_is_a_clear_error(exported, tmp_path):
    cache = _hf_cache(tmp_path, exported, with_weights=False)  # config.json cached, weights not
    proc = _offline(f"import timm; timm.create_model('hf-hub:{REPO}', pretrained=True)", cache)
    assert proc.returncode != 0
    assert f'Could not load pretrained weights for {TAG_MODEL} ({TAG} tag) from {REPO}' in proc.stderr


def test_registered_tags_are_exactly_the_published_releases():
    """timm.list_pretrained names a NAM-trained timm-nam tag only if its weights were published
    (hub_configs/README.md); the other tags are timm's plain weights (test_pretrained.py)."""
    ours = timm.list_models(module=list(MODEL_MODULES))
    tags = {n for n in timm.list_pretrained('*') if '.' in n and n.split('.')[0] in ours}
    tags = {n for n in tags if not n.split('.')[1].startswith(PLAIN_TAG_PREFIX)}
    folders = Path(__file__).parents[1] / 'hub_configs'
    staged = {d.name for d in folders.iterdir() if d.is_dir()}
    published = {name for name in staged if (folders / name / 'published.json').is_file()}
    assert tags == published
    assert {f'{TAG_MODEL}.{TAG}', 'resnet50_nam.imagenette_r64'} <= staged - published
    for name in tags:
        cfg = timm.models.get_pretrained_cfg(name).to_dict()
        record = json.loads((folders / name / 'published.json').read_text())
        config = json.loads((folders / name / 'config.json').read_text())
        assert cfg['hf_hub_id'] == hub_id(*name.split('.')) == record['repo_id'] and len(record['revision']) == 40
        assert cfg['hf_hub_id'].startswith(f'{HF_ORG}/') and config['pretrained_cfg']['hf_hub_id'] == cfg['hf_hub_id']
        assert config['num_classes'] == cfg['num_classes']
        assert tuple(config['pretrained_cfg']['input_size']) == tuple(cfg['input_size'])
        for key in ('classifier', 'first_conv', 'mean', 'std', 'crop_pct', 'license', 'paper_ids', 'origin_url'):
            assert cfg.get(key) is not None, (name, key)


def test_publish_dry_run_lists_exactly_the_files(exported, capsys):
    plan = publish(exported, dry_run=True)
    assert [f['path'] for f in plan] == sorted(p.name for p in exported.iterdir())
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'publish', str(exported), '--dry-run'],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, 'HF_HUB_OFFLINE': '1'},
    )
    assert proc.returncode == 0, proc.stderr
    assert f'would upload to https://huggingface.co/{REPO}:' in proc.stdout
    assert proc.stdout.count('sha256') == len(plan)


def test_publish_refuses_pickles_and_incomplete_exports(exported, tmp_path):
    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in ('config.json', 'README.md', 'model.safetensors'):
        (bad / name).write_bytes((exported / name).read_bytes())
    (bad / 'pytorch_model.bin').write_bytes(b'x')
    with pytest.raises(ValueError, match='contains pickle files'):
        upload_plan(bad)
    (bad / 'pytorch_model.bin').unlink()
    (bad / 'README.md').unlink()
    with pytest.raises(FileNotFoundError, match='missing README.md'):
        upload_plan(bad)


def test_export_needs_the_run_records(trained_run, tmp_path):
    partial = tmp_path / 'partial'
    partial.mkdir()
    (partial / 'last.pth.tar').write_bytes((trained_run / 'last.pth.tar').read_bytes())
    with pytest.raises(FileNotFoundError, match="Not the output directory of timm's train.py: args.yaml, summary.csv"):
        export_run(partial, tmp_path / 'out', tag='x')
    for name in ('args.yaml', 'summary.csv'):
        (partial / name).write_bytes((trained_run / name).read_bytes())
    (partial / 'last.pth.tar').rename(partial / 'other.pth.tar')
    with pytest.raises(
        FileNotFoundError, match='No checkpoint in .*: expected one of model_best.pth.tar, last.pth.tar'
    ):
        export_run(partial, tmp_path / 'out', tag='x')
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'export', str(tmp_path / 'nowhere'), str(tmp_path / 'out'), '--tag', 'x'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr and 'does not exist' in proc.stderr


def test_names_without_weights_refuse_pretrained():
    model = timm.create_model(TAG_MODEL)
    assert model.num_classes == 1000 and model.pretrained_cfg['input_size'] == (3, 224, 224)
    with pytest.raises(RuntimeError, match=rf'Invalid pretrained tag \({TAG}\) for {TAG_MODEL}'):
        timm.create_model(f'{TAG_MODEL}.{TAG}')  # staged, not published: not a registered tag
    with pytest.raises(ValueError, match='resnet18_se has no pretrained weights.*no trained tags exist yet'):
        timm.create_model('resnet18_se', pretrained=True)
