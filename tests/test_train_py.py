"""timm's own, unmodified train.py with timm-nam: --device-modules timm_nam, the penalty as a model kwarg, and its
output exported for the Hub by ``timm-nam export``.

train.py is not in timm's wheel: TIMM_TRAIN_PY names it (from timm's repository); without it the tests look for the
unmodified copy kept beside this repository, ``../shared/upstream/timm-train.py``, and skip if there is none.
The check: with plain SGD (no momentum, no weight decay, constant lr), a run with ``nam_penalty=p`` moves
every NAM scale by ``-steps · lr · p · sign(γ)`` relative to the same run without it — under fp16 autocast
with GradScaler, gradient accumulation, and torchrun with 2 processes.
"""

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import make_image_folder

_BESIDE = Path(__file__).resolve().parents[2] / 'shared' / 'upstream' / 'timm-train.py'
TRAIN_PY = os.environ.get('TIMM_TRAIN_PY') or (str(_BESIDE) if _BESIDE.is_file() else None)
pytestmark = pytest.mark.skipif(not TRAIN_PY, reason="set TIMM_TRAIN_PY to the path of timm's train.py")

LR, P = 0.1, 0.05


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _run_train_py(data, out, penalty, nproc=1, extra=(), model='resnet50_nam', img_size=64, model_kwargs=()):
    launcher = (
        [sys.executable]
        if nproc == 1
        else [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node',
            str(nproc),
            '--master_port',
            str(_free_port()),
        ]
    )
    args = [
        TRAIN_PY,
        '--data-dir',
        str(data),
        '--model',
        model,
        '--device-modules',
        'timm_nam',
        '--model-kwargs',
        f'nam_penalty={penalty}',
        *model_kwargs,
        '--num-classes',
        '3',
        '--img-size',
        str(img_size),
        '--epochs',
        '1',
        '-b',
        str(8 // nproc),
        '--opt',
        'momentum',
        '--momentum',
        '0',
        '--weight-decay',
        '0',
        '--lr',
        str(LR),
        '--sched',
        'step',
        '--decay-epochs',
        '100',
        '--warmup-epochs',
        '0',
        '--smoothing',
        '0',
        '--workers',
        '0',
        '--no-prefetcher',
        '--device',
        'cpu',
        '--seed',
        '0',
        '--output',
        str(out),
        '--experiment',
        'run',
        *extra,
    ]
    proc = subprocess.run(
        launcher + args, capture_output=True, text=True, timeout=900, env={**os.environ, 'TIMM_DISABLE_PLUGINS': '1'}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / 'run'


def _train(data, out, penalty, **kw):
    """NAM's scales after a train.py run."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = torch.load(_run_train_py(data, out, penalty, **kw) / 'last.pth.tar', weights_only=True)['state_dict']
    return {k: v for k, v in state.items() if k.endswith('.nam.bn.weight')}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, per_class=8, size=64)


@pytest.mark.slow
@pytest.mark.parametrize('setting', ['fp16_accum', 'torchrun2'])
def test_train_py_applies_the_penalty_exactly(data_dir, tmp_path, setting):
    if setting == 'fp16_accum':
        kw = dict(extra=['--amp', '--amp-dtype', 'float16', '--grad-accum-steps', '2'])
        steps = 2  # 3 batches of 8 (24 images), accumulated 2 + 1: two optimizer steps
    else:
        if not torch.cuda.is_available():
            pytest.skip(
                "timm's train.py passes device_ids=[cpu] to DistributedDataParallel, which PyTorch rejects: "
                'its torchrun path needs CUDA (the step hook under DDP is tested in test_penalty.py)'
            )
        kw = dict(nproc=2, extra=['--device', 'cuda'])
        steps = 3  # 3 global batches of 2 x 4
    without = _train(data_dir, tmp_path / 'off', 0.0, **kw)
    with_pen = _train(data_dir, tmp_path / 'on', P, **kw)
    assert len(with_pen) == 16
    for k in with_pen:
        shift = with_pen[k] - without[k]
        expected = -steps * LR * P * torch.sign(without[k])
        # the criterion's own gradient on γ differs only at second order between the two runs
        torch.testing.assert_close(
            shift,
            expected,
            rtol=0,
            atol=0.05 * steps * LR * P,
            msg=lambda m: f'{k}: shift mean {shift.mean():.5f} vs expected {expected.mean():.5f}\n{m}',
        )


def test_device_modules_builds_our_model(data_dir, tmp_path):
    state = _train(data_dir, tmp_path / 'plain', 0.0)
    assert len(state) == 16


def test_a_train_py_run_exports_for_the_hub_and_loads_back(data_dir, tmp_path):
    """``timm-nam export`` takes train.py's output directory; the export records the size the run trained at and
    loads through ``local-dir:`` with the checkpoint's outputs."""
    import json

    import timm

    from timm_nam.train_run import create_model_from_run, read_run

    run = _run_train_py(data_dir, tmp_path / 'train', 1e-4, model='resnet18_nam', img_size=48)
    out = tmp_path / 'export'
    proc = subprocess.run(
        [sys.executable, '-m', 'timm_nam', 'export', str(run), str(out), '--tag', 'tiny'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'resnet18_nam' and config['num_classes'] == 3
    assert config['pretrained_cfg']['input_size'] == [3, 48, 48] and config['pretrained_cfg']['tag'] == 'tiny'
    assert 'p = 0.0001' in (out / 'README.md').read_text()
    x = torch.randn(2, 3, 48, 48)
    expected = create_model_from_run(read_run(run))(x)  # model_best.pth.tar
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert timm.data.resolve_data_config({}, model=loaded)['input_size'] == (3, 48, 48)
    torch.testing.assert_close(loaded(x), expected)


def test_any_backbone_with_nam_trains_validates_and_exports(data_dir, tmp_path):
    """A base with no registered NAM model, from its plain weights in a local file: train.py's ``--model nam
    --model-kwargs base=...`` with ``--pretrained-path``, validate.py's way of loading the checkpoint, ``timm-nam
    sparsity`` and ``timm-nam export``, whose folder builds the same network through ``local-dir:``."""
    import json

    import timm
    from huggingface_hub import ModelCard
    from safetensors.torch import save_file
    from timm.models import load_checkpoint

    from timm_nam.layers import NAMChannel
    from timm_nam.train_run import create_model_from_run, read_run

    plain = tmp_path / 'regnety_002.safetensors'
    save_file(timm.create_model('regnety_002').state_dict(), str(plain))
    extra = ['--pretrained', '--pretrained-path', str(plain)]
    run = _run_train_py(
        data_dir,
        tmp_path / 'train',
        'paper',
        model='nam',
        img_size=48,
        extra=extra,
        model_kwargs=['base=regnety_002', 'weighting=mean'],
    )
    x = torch.randn(2, 3, 48, 48)
    trained = create_model_from_run(read_run(run / 'last.pth.tar'))
    assert {m.weighting for m in trained.modules() if isinstance(m, NAMChannel)} == {'mean'}
    validated = timm.create_model('nam', num_classes=3, base='regnety_002', weighting='mean')  # validate.py
    load_checkpoint(validated, str(run / 'last.pth.tar'))
    torch.testing.assert_close(validated.eval()(x), trained(x), rtol=0, atol=0)

    tool = [sys.executable, '-m', 'timm_nam']
    proc = subprocess.run([*tool, 'sparsity', str(run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and 'regnety_002_nam from' in proc.stdout, proc.stderr[-3000:]
    out = tmp_path / 'export'
    proc = subprocess.run([*tool, 'export', str(run), str(out), '--tag', 'tiny'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'nam'
    assert config['model_args']['base'] == 'regnety_002' and config['model_args']['weighting'] == 'mean'
    assert config['pretrained_cfg']['hf_hub_id'] == 'timm-nam/regnety_002_nam.tiny'
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    torch.testing.assert_close(loaded(x), create_model_from_run(read_run(run))(x), rtol=0, atol=1e-6)
    # the accuracy its card states, on the photos train.py scored it on, with the export's own data config
    card = ModelCard.load(out / 'README.md')
    stated = next(r.metric_value for r in card.data.eval_results if r.metric_name == 'top-1 accuracy')
    assert stated == pytest.approx(read_run(run).summary[-1]['eval_top1'], abs=0.01)
    config = timm.data.resolve_data_config({}, model=loaded)
    dataset = timm.data.create_dataset('', root=str(data_dir), split='validation')
    loader = timm.data.create_loader(dataset, batch_size=8, use_prefetcher=False, **config)
    with torch.no_grad():
        correct = sum((loaded(images).argmax(1) == labels).sum().item() for images, labels in loader)
    assert 100 * correct / len(dataset) == pytest.approx(stated, abs=0.01)
