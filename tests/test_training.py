"""The study trainer (lab.train): exact resume after a real kill, DDP == accumulation, metrics, the penalty applied
once, data and model randomness kept apart, diverging runs and damaged checkpoints stopped with clear errors,
--compile, CIFAR-100."""

import json
import math
import os
import pickle
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from lab.train import main
from lab.trainer.data import GlobalBatchSampler, SeededDataset, build_datasets, train_loader
from lab.trainer.loop import create_lr_scheduler
from lab.trainer.recipes import get_recipe
from tests.helpers import lab_env, make_image_folder
from timm_nam.penalty import nam_scales

# a small NAM model at 32 px: seconds per epoch on 2 CPU cores
BASE = [
    '-m',
    'resnet18_nam',
    '--recipe',
    'cifar',
    '--img-size',
    '32',
    '-b',
    '8',
    '--lr',
    '0.05',
    '--workers',
    '0',
    '--device',
    'cpu',
    '--nam-penalty',
    '1e-3',
]


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, per_class=8, size=32)


def _cmd(*args):
    return [sys.executable, '-m', 'lab.train', *args]


def _run(args, **kw):
    env = lab_env({**os.environ, 'OMP_NUM_THREADS': '1'})
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, **kw)


def _params(run_dir: Path, exclude_buffers=False):
    state = load_file(str(run_dir / 'last.safetensors'))
    if exclude_buffers:
        state = {
            k: v for k, v in state.items() if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
        }
    return state


def test_train_writes_weights_state_and_metrics(data_dir, tmp_path):
    out = tmp_path / 'run'
    proc = _run(
        _cmd(
            *BASE,
            '--data-dir',
            str(data_dir),
            '-o',
            str(out),
            '--epochs',
            '2',
            '--amp',
            '--amp-dtype',
            'float16',
            '--channels-last',
            '--model-ema',
            '--model-ema-decay',
            '0.5',
            '--warmup-epochs',
            '1',
        )
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in (
        'last.safetensors',
        'best.safetensors',
        'last_ema.safetensors',
        'last_state.pt',
        'metrics.csv',
        'metrics.json',
        'args.json',
    ):
        assert (out / name).is_file(), name
    rows = json.loads((out / 'metrics.json').read_text())
    assert [r['epoch'] for r in rows] == [0, 1]
    assert all(0 <= r['val_top1'] <= 100 and r['train_penalty'] > 0 and r['img_per_s'] > 0 for r in rows)
    assert all(r['ema_val_top1'] is not None for r in rows)
    assert rows[0]['lr'] == pytest.approx(1e-5) and rows[1]['lr'] == pytest.approx(0.05)  # warmup, then the lr
    assert (out / 'metrics.csv').read_text().splitlines()[0].startswith('epoch,lr,train_loss,train_penalty')
    args = json.loads((out / 'args.json').read_text())
    assert args['penalty_p'] == 1e-3 and args['recipe']['decay_milestones'] == [60, 120, 160]
    state = torch.load(out / 'last_state.pt', weights_only=True)
    assert state['epoch'] == 1 and 'optimizer' in state and 'rng' in state and state['scaler']  # fp16 GradScaler
    # the authors' optimizer: plain momentum SGD with weight decay on every parameter, biases and BN included
    assert [(g['momentum'], g['nesterov'], g['weight_decay']) for g in state['optimizer']['param_groups']] == [
        (0.9, False, 5e-4)
    ]
    assert 'best val top1' in proc.stdout
    # every file of the run is as readable as the metrics (safetensors on its own writes 0600)
    assert len({stat.S_IMODE(f.stat().st_mode) for f in out.iterdir()}) == 1


@pytest.mark.parametrize(
    'schedule',
    [
        [],  # the recipe's per-epoch schedule
        ['--warmup-epochs', '3', '--sched-on-updates'],  # killed inside a per-step warmup: resumes at the exact step
    ],
    ids=['per_epoch', 'per_step_warmup'],
)
def test_killed_and_resumed_run_equals_uninterrupted(data_dir, tmp_path, schedule):
    epochs = ['--epochs', '4', *schedule]
    ref = tmp_path / 'ref'
    assert _run(_cmd(*BASE, '--data-dir', str(data_dir), '-o', str(ref), *epochs)).returncode == 0

    killed = tmp_path / 'killed'
    proc = subprocess.Popen(
        _cmd(*BASE, '--data-dir', str(data_dir), '-o', str(killed), *epochs),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=lab_env({**os.environ, 'OMP_NUM_THREADS': '1'}),
    )
    metrics = killed / 'metrics.json'
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(json.loads(metrics.read_text() or '[]')) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, 'run finished before it could be killed'
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before_resume = json.loads(metrics.read_text())
    done = len(before_resume)
    assert 2 <= done < 4

    resumed = _run(_cmd(*BASE, '--data-dir', str(data_dir), '-o', str(killed), *epochs, '--resume', str(killed)))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _params(ref), _params(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the resume continued: the epochs trained before the kill keep their rows (their timings included, which no
    # rerun would reproduce), and only the remaining epochs ran
    after_resume = json.loads(metrics.read_text())
    assert after_resume[:done] == before_resume
    assert [r['epoch'] for r in after_resume] == [0, 1, 2, 3]
    assert re.findall(r'^epoch (\d)/4:', resumed.stdout, re.M) == [str(e) for e in range(done + 1, 5)]


def _lr_per_step(recipe, epochs: int, steps_per_epoch: int) -> list:
    """The lr of every optimizer step, calling the scheduler as the training loop does."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    scheduler, _ = create_lr_scheduler(optimizer, recipe, steps_per_epoch=steps_per_epoch)
    lrs = []
    for epoch in range(epochs):
        for step in range(steps_per_epoch):
            lrs.append(optimizer.param_groups[0]['lr'])
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
        scheduler.step(epoch + 1)
    return lrs


@pytest.mark.parametrize('on_updates', [False, True])
def test_warmup_ramps_per_step_only_with_sched_on_updates(on_updates):
    recipe = get_recipe('imagenet', epochs=4, warmup_epochs=1, lr=0.1, sched_on_updates=on_updates)
    lrs = _lr_per_step(recipe, epochs=2, steps_per_epoch=10)
    warmup, after = lrs[:10], lrs[10:]
    if on_updates:  # linear from timm's warmup lr (1e-5) to 0.1 over the 10 steps of the warmup epoch
        assert warmup == pytest.approx([1e-5 + (0.1 - 1e-5) * s / 10 for s in range(10)])
        assert after[1] < after[0]  # cosine decay within the epoch
    else:  # the whole warmup epoch at 1e-5, then one lr per epoch
        assert warmup == pytest.approx([1e-5] * 10) and len(set(after)) == 1
    assert after[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))  # both agree at epoch starts


@pytest.mark.parametrize('on_updates', [False, True])
def test_decay_milestones_match_the_authors_multisteplr(on_updates):
    # their script: torch.optim.lr_scheduler.MultiStepLR(milestones, gamma=0.2), stepped after every epoch
    recipe = get_recipe('cifar', epochs=5, decay_milestones=(2, 4), sched_on_updates=on_updates)
    lrs = _lr_per_step(recipe, epochs=5, steps_per_epoch=3)
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
    reference = torch.optim.lr_scheduler.MultiStepLR(reference_opt, milestones=[2, 4], gamma=0.2)
    expected = []
    for _ in range(5):
        expected += [reference_opt.param_groups[0]['lr']] * 3
        reference_opt.step()  # (no gradients: only so the reference scheduler may step)
        reference.step()
    assert lrs == pytest.approx(expected)
    assert lrs[::3] == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004])


@pytest.mark.parametrize('on_updates', [False, True])
def test_decay_milestones_with_warmup_count_from_the_first_epoch(on_updates):
    # warmup replaces the first epoch's lr; milestones stay epochs of the whole run (not shifted by the warmup)
    recipe = get_recipe('cifar', epochs=5, decay_milestones=(2, 4), warmup_epochs=1, sched_on_updates=on_updates)
    lrs = _lr_per_step(recipe, epochs=5, steps_per_epoch=4)
    if on_updates:  # linear from timm's warmup lr (1e-5) to 0.1 over the 4 steps of the warmup epoch
        assert lrs[:4] == pytest.approx([1e-5 + (0.1 - 1e-5) * s / 4 for s in range(4)])
    else:
        assert lrs[:4] == pytest.approx([1e-5] * 4)
    assert lrs[4:] == pytest.approx([0.1] * 4 + [0.02] * 8 + [0.004] * 4)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process_same_global_batch(data_dir, tmp_path):
    """torchrun, 2 gloo processes x 4 images == 1 process x 2 accumulated micro-batches of 4 (global batch 8).

    Parameters agree to 1e-5 (all-reduce vs. accumulation summation order); BN running statistics are
    excluded: under DDP they follow rank 0's half of each batch, by design of DDP's buffer broadcast."""
    common = [*BASE, '--data-dir', str(data_dir), '--epochs', '2']
    ddp = _run(
        [
            sys.executable,
            '-m',
            'torch.distributed.run',
            '--nproc_per_node',
            '2',
            '--master_port',
            str(_free_port()),
            '-m',
            'lab.train',
            *common,
            '-o',
            str(tmp_path / 'ddp'),
        ]
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _run(_cmd(*common, '-o', str(tmp_path / 'single'), '--grad-accum-steps', '2'))
    assert single.returncode == 0, single.stderr[-2000:]
    a = _params(tmp_path / 'ddp', exclude_buffers=True)
    b = _params(tmp_path / 'single', exclude_buffers=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((tmp_path / 'ddp' / 'args.json').read_text())['world_size'] == 2


def test_global_batch_sampler_chunks():
    one = GlobalBatchSampler(20, 8, seed=3, accum_steps=2)
    ranks = [GlobalBatchSampler(20, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    chunks_one = list(one)
    chunks_ddp = [list(s) for s in ranks]
    assert len(chunks_one) == 4 and all(len(c) == 4 for c in chunks_one)
    assert chunks_one[0::2] == chunks_ddp[0] and chunks_one[1::2] == chunks_ddp[1]
    one.set_epoch(1)
    assert list(one) != chunks_one
    with pytest.raises(ValueError, match='does not split into 3 process'):
        GlobalBatchSampler(20, 8, seed=0, world_size=3)


class _RandomDraws(torch.utils.data.Dataset):
    """Stands in for a random augmentation: each item is (index, one draw from torch's RNG)."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        return index, torch.rand(())


def _draws_per_epoch(workers, epochs=3):
    dataset = SeededDataset(_RandomDraws(), seed=5)
    sampler = GlobalBatchSampler(len(dataset), 4, seed=5)
    loader = train_loader(dataset, sampler, workers)
    per_epoch = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        draws = {int(i): float(d) for idx, draw in loader for i, d in zip(idx, draw)}
        per_epoch.append([draws[i] for i in range(len(dataset))])
    return per_epoch


class _EveryRngDraws(torch.utils.data.Dataset):
    """Stands in for augmentations drawing from torch's, Python's and numpy's global RNGs."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        return float(torch.rand(())), random.random(), float(np.random.random())


def _global_rng_states():
    numpy_state = np.random.get_state()
    return torch.get_rng_state(), random.getstate(), numpy_state[1].copy(), numpy_state[2:]


def test_seeded_items_leave_the_global_rngs_alone():
    dataset = SeededDataset(_EveryRngDraws(), seed=5)
    before = _global_rng_states()
    items = [dataset[i] for i in range(4)]
    after = _global_rng_states()
    assert torch.equal(after[0], before[0]) and after[1] == before[1]
    assert np.array_equal(after[2], before[2]) and after[3] == before[3]
    assert [dataset[i] for i in range(4)] == items  # still seeded: the same draws again
    assert len({draw for item in items for draw in item}) == 12
    dataset.set_epoch(1)
    assert all(dataset[i] != items[i] for i in range(4))


def _next_model_draw(workers):
    """What the model (dropout, drop-path) draws after an epoch of data loaded with ``workers`` processes."""
    torch.manual_seed(7)
    for _ in train_loader(SeededDataset(_RandomDraws(), seed=5), GlobalBatchSampler(16, 4, seed=5), workers):
        pass
    return torch.rand(()).item()


def test_model_randomness_does_not_depend_on_the_worker_count():
    assert _next_model_draw(0) == _next_model_draw(2)


def test_augmentation_changes_every_epoch_with_worker_processes():
    # Regression: persistent workers kept epoch 0's dataset copy, so each image got the same crop every epoch.
    in_process, two_workers = _draws_per_epoch(0), _draws_per_epoch(2)
    assert two_workers == in_process  # the worker count does not change the data
    assert all(a != b for a, b in zip(two_workers[0], two_workers[1]))
    assert all(a != b for a, b in zip(two_workers[1], two_workers[2]))


@pytest.mark.parametrize(
    'args,message',
    [
        (['--data-dir', '/nonexistent/dir'], "Data directory '/nonexistent/dir' does not exist"),
        (['--model', 'resnet50_nmm'], "Unknown model 'resnet50_nmm'"),
        (['--dataset', 'torch/cifar100'], "torch/cifar100 expects torchvision's layout"),
    ],
)
def test_bad_input_is_a_clear_error(data_dir, tmp_path, args, message):
    argv = [*BASE, '--data-dir', str(data_dir), '-o', str(tmp_path / 'x'), '--epochs', '1']
    for flag, value in zip(args[0::2], args[1::2]):
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    proc = _run(_cmd(*argv))
    assert proc.returncode == 2
    assert message in proc.stderr and 'Traceback' not in proc.stderr


def test_wrong_layout_and_wrong_checkpoint_are_clear_errors(data_dir, tmp_path):
    flat = tmp_path / 'flat'
    (flat / 'class0').mkdir(parents=True)
    proc = _run(_cmd(*BASE, '--data-dir', str(flat), '-o', str(tmp_path / 'y'), '--epochs', '1'))
    assert proc.returncode == 2 and 'is not an ImageFolder dataset' in proc.stderr

    run = tmp_path / 'r18'
    assert _run(_cmd(*BASE, '--data-dir', str(data_dir), '-o', str(run), '--epochs', '1')).returncode == 0
    other = [a if a != 'resnet18_nam' else 'resnet34_nam' for a in BASE]
    proc = _run(_cmd(*other, '--data-dir', str(data_dir), '-o', str(run), '--epochs', '2', '--resume', str(run)))
    assert proc.returncode == 2
    assert "holds a 'resnet18_nam' model, not 'resnet34_nam'" in proc.stderr


def test_cifar_augmentation_shifts_the_validation_view_of_larger_images(tmp_path):
    # a 64-px image, white centre square on black: at 16 px the square fills the centre 8x8 (a quarter). The
    # cifar recipe's crop (pad 16 / 8 = 2) and flip keep that square in view, so every training sample is a quarter
    # white, like validation; a crop taken before resizing would show a 16-px patch of the 64-px image instead.
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[16:48, 16:48] = 255
    for split in ('train', 'val'):
        (tmp_path / split / 'a').mkdir(parents=True)
        Image.fromarray(img).save(tmp_path / split / 'a' / '0.png')
    train, val, _ = build_datasets(str(tmp_path), '', 'cifar', 16, 'resnet18_nam')
    v = val[0][0]
    grey = (v[0].min() + v[0].max()) / 2  # the normalized mid-grey: resizing softens the square's edge pixels

    def white(x):  # share of the image inside the square
        return (x[0] > grey).float().mean().item()

    assert v.shape == (3, 16, 16) and white(v) == pytest.approx(0.25)
    torch.manual_seed(0)
    shares = [white(train[0][0]) for _ in range(20)]
    assert shares == pytest.approx([0.25] * 20)
    # the padding is an eighth of the size (CIFAR's 4 px at 32 px): at 64 px the square moves by up to 8 px
    train64, _, _ = build_datasets(str(tmp_path), '', 'cifar', 64, 'resnet18_nam')
    shifts = [abs(int((train64[0][0][0, 32] > grey).nonzero()[0]) - 16) for _ in range(40)]
    assert max(shifts) == 8 and min(shifts) == 0


def _first_step_grads(argv):
    """Every parameter's gradient as the first ``optimizer.step()`` of an in-process ``python -m lab.train`` used it."""
    grads = []

    def record(optimizer, args, kwargs):
        if not grads:
            grads.extend(p.grad.clone() for group in optimizer.param_groups for p in group['params'])

    handle = register_optimizer_step_post_hook(record)
    try:
        assert main([*argv]) == 0
    finally:
        handle.remove()
    return grads


def test_penalty_as_model_kwarg_is_applied_once(data_dir, tmp_path):
    p = 0.01
    common = [*BASE[:-2], '--data-dir', str(data_dir), '--epochs', '1', '--limit-train-steps', '1']  # BASE[:-2]: no p
    plain = _first_step_grads([*common, '-o', str(tmp_path / 'plain'), '--nam-penalty', '0'])
    penalized = _first_step_grads([*common, '-o', str(tmp_path / 'p'), '--model-kwargs', f'nam_penalty={p}'])
    model = timm.create_model('resnet18_nam', num_classes=3)  # as trained, before its first step
    assert [g.shape for g in plain] == [q.shape for q in model.parameters()]  # the optimizer's order is the model's
    scales = {id(s) for s in nam_scales(model)}
    assert sum(id(q) in scales for q in model.parameters()) == 8
    for q, without, with_penalty in zip(model.parameters(), plain, penalized):
        # d(p·Σ|γ|)/dγ = p·sign(γ), added once; nothing else changes
        expected = p * torch.sign(q.detach()) if id(q) in scales else torch.zeros_like(without)
        torch.testing.assert_close(with_penalty - without, expected, rtol=0, atol=1e-6)
    assert json.loads((tmp_path / 'p' / 'args.json').read_text())['penalty_p'] == p


def test_penalty_flag_and_model_kwarg_must_agree(data_dir, tmp_path, capsys):
    argv = [*BASE, '--data-dir', str(data_dir), '-o', str(tmp_path / 'x'), '--epochs', '1']
    assert main([*argv, '--model-kwargs', 'nam_penalty=0.01']) == 2
    assert 'two different penalties asked for: p = 0.001 and the model kwarg nam_penalty = 0.01' in (
        capsys.readouterr().err
    )


def test_only_bad_input_is_a_one_line_error(data_dir, tmp_path, capsys, monkeypatch):
    argv = [*BASE, '--data-dir', str(data_dir), '-o', str(tmp_path / 'x'), '--epochs', '1']
    assert main([*argv, '--model-kwargs', 'no_such_kwarg=1']) == 2
    err = capsys.readouterr().err
    assert err.startswith("lab.train: error: resnet18_nam cannot be built with the model kwargs {'no_such_kwarg': 1}")
    assert "unexpected keyword argument 'no_such_kwarg'" in err

    def broken(*args, **kwargs):
        raise TypeError('a fault inside timm-nam')

    # a TypeError that is not about the input is a fault to debug: it keeps its traceback
    monkeypatch.setattr('lab.trainer.data.build_datasets', broken)
    with pytest.raises(TypeError, match='a fault inside timm-nam'):
        main(argv)


def test_malformed_model_kwargs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['-m', 'resnet18_nam', '--data-dir', 'data', '-o', 'out', '--model-kwargs', 'layers'])
    assert exit_info.value.code == 2
    assert "argument --model-kwargs: expected key=value, got 'layers'" in capsys.readouterr().err


def test_resume_from_a_damaged_checkpoint_is_a_clear_error(data_dir, tmp_path):
    run = tmp_path / 'run'
    argv = [*BASE, '--data-dir', str(data_dir), '-o', str(run)]
    assert _run(_cmd(*argv, '--epochs', '1')).returncode == 0
    last = run / 'last.safetensors'
    intact = last.read_bytes()
    # weights of another epoch than the state (a run stopped between writing the two) cannot resume exactly
    with safe_open(str(last), framework='pt') as f:
        meta = dict(f.metadata(), epoch='1')
    save_file(load_file(str(last)), str(last), metadata=meta)
    proc = _run(_cmd(*argv, '--epochs', '2', '--resume', str(run)))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert f'{last} (epoch 2) and {run / "last_state.pt"} (epoch 1) do not belong together' in proc.stderr

    last.write_bytes(intact[: len(intact) // 2])  # as a full disk or a cut-off copy leaves it
    proc = _run(_cmd(*argv, '--epochs', '2', '--resume', str(run)))
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert f'lab.train: error: {last} is damaged and cannot be read' in proc.stderr
    assert f'delete last.safetensors and last_state.pt from {run} to train that run afresh' in proc.stderr


def test_diverging_run_stops_and_keeps_the_last_finite_checkpoints(data_dir, tmp_path):
    run = tmp_path / 'run'
    # the warmup epoch trains at 1e-5, the next one at 1e8: it diverges within a few steps
    argv = [*BASE, '--data-dir', str(data_dir), '-o', str(run), '--warmup-epochs', '1', '--lr', '1e8']
    assert _run(_cmd(*argv, '--epochs', '1')).returncode == 0
    saved = {f: (run / f).read_bytes() for f in ('last.safetensors', 'best.safetensors', 'last_state.pt')}
    proc = _run(_cmd(*argv, '--epochs', '3', '--resume', str(run)))
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert re.search(
        r'lab.train: error: the loss is (nan|inf) at epoch 2, step \d \(lr 1e\+08\): training '
        r'diverged\. Try a lower learning rate \(--lr\)',
        proc.stderr,
    ), proc.stderr[-2000:]
    assert {f: (run / f).read_bytes() for f in saved} == saved
    for f in ('last.safetensors', 'best.safetensors'):
        assert all(torch.isfinite(t).all() for t in load_file(str(run / f)).values()), f
    assert [r['epoch'] for r in json.loads((run / 'metrics.json').read_text())] == [0]


@pytest.mark.slow  # inductor compiles C++ kernels: ~45 s on 2 CPU cores the first time, seconds once cached
def test_compiled_training_matches_eager(data_dir, tmp_path):
    tiny = ['--model-kwargs', 'layers=(1,1,1,1)', 'channels=(8,8,8,8)', '--epochs', '1', '--limit-train-steps', '2']
    argv = [*BASE, '--data-dir', str(data_dir), *tiny]
    eager = _run(_cmd(*argv, '-o', str(tmp_path / 'eager')))
    assert eager.returncode == 0, eager.stderr[-2000:]
    compiled = _run(_cmd(*argv, '-o', str(tmp_path / 'compiled'), '--compile'))
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    a, b = _params(tmp_path / 'eager'), _params(tmp_path / 'compiled')
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    rows = json.loads((tmp_path / 'compiled' / 'metrics.json').read_text())
    assert rows[0]['train_penalty'] > 0  # the loss reached the NAM scales through the compiled model


def _write_cifar100(root: Path, train: int = 16, test: int = 8) -> Path:
    """A small CIFAR-100 in torchvision's on-disk layout: cifar-100-python/{train,test,meta}, pickled dicts."""
    folder = root / 'cifar-100-python'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', train), ('test', test)):
        labels = [i % 4 for i in range(n)]
        entry = {
            'filenames': [f'{split}_{i}.png' for i in range(n)],
            'batch_label': f'{split} batch',
            'fine_labels': labels,
            'coarse_labels': [label // 2 for label in labels],
            'data': rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
        }
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {
        'fine_label_names': [f'class{i}' for i in range(100)],
        'coarse_label_names': [f'super{i}' for i in range(20)],
    }
    (folder / 'meta').write_bytes(pickle.dumps(meta))
    return root


def test_trains_on_torch_cifar100(tmp_path, monkeypatch):
    # torchvision checks the md5 of the real CIFAR-100 files; these synthetic ones only need to exist
    monkeypatch.setattr('torchvision.datasets.cifar.check_integrity', lambda path, md5=None: os.path.isfile(path))
    root = _write_cifar100(tmp_path / 'cifar')
    train, val, num_classes = build_datasets(str(root), 'torch/cifar100', 'cifar', 32, 'resnet18_nam')
    assert (len(train), len(val), num_classes) == (16, 8, 100)
    image, label = train[5]
    assert image.shape == (3, 32, 32) and label == 1
    out = tmp_path / 'run'
    argv = ['-m', 'resnet18_nam', '--dataset', 'torch/cifar100', '--data-dir', str(root), '-o', str(out)]
    assert main([*argv, '--recipe', 'cifar', '-b', '8', '--epochs', '1', '--workers', '0', '--device', 'cpu']) == 0
    assert json.loads((out / 'args.json').read_text())['num_classes'] == 100
    assert load_file(str(out / 'last.safetensors'))['fc.weight'].shape == (100, 512)
    assert [r['epoch'] for r in json.loads((out / 'metrics.json').read_text())] == [0]


def test_initial_checkpoint_starts_a_nam_model_from_a_plain_run(data_dir, tmp_path):
    """--initial-checkpoint: a plain run's weights, converted for the NAM model (the fine-tuning study's start)."""
    from lab.trainer.loop import Run, TrainConfig
    from timm_nam import load_plain_weights

    plain_argv = [a if a != 'resnet18_nam' else 'resnet18' for a in BASE[:-2]]  # no penalty: no NAM
    plain_run = tmp_path / 'plain'
    argv = [*plain_argv, '--data-dir', str(data_dir), '-o', str(plain_run), '--epochs', '1']
    assert main(argv) == 0
    cfg = TrainConfig(
        model='resnet18_nam',
        data_dir=str(data_dir),
        output=str(tmp_path / 'nam'),
        recipe=get_recipe('cifar', img_size=32, batch_size=8, epochs=1),
        recipe_name='cifar',
        workers=0,
        device='cpu',
        initial_checkpoint=str(plain_run),
    )
    run = Run(cfg)
    expected = load_plain_weights(timm.create_model('resnet18_nam', num_classes=3), plain_run / 'last.safetensors')
    got = run.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    assert json.loads((tmp_path / 'nam' / 'args.json').read_text())['initial_checkpoint'] == str(plain_run)
