"""Does adding NAM to a trained network help? Fine-tune a trained plain ResNet-18 (a) converted exactly to NAM, with
the paper's penalty, (b) as it is, and (c) converted to NAM with ``nam_weighting='mean'``: same recipe and epochs,
seeds 0-2. Every run appends one row to ``results/nam_finetune/runs.csv``; rows already there are skipped.

    python -m lab.finetune_study --data-dir ../shared/data/imagenette2-224 --start runs/resnet18_s0
    python -m lab.finetune_study ... --list          # what is left

``--start`` is the plain network's run directory (its last.safetensors), trained with the Imagenette study's recipe
(results/nam_finetune/README.md).
"""

import argparse
import csv
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import timm_nam
from lab.imagenette_study import append_row, device_label, split_spec

RECIPE = [
    '--recipe',
    'imagenet',
    '--img-size',
    '64',
    '-b',
    '64',
    '--epochs',
    '5',
    '--warmup-epochs',
    '0',
    '--sched-on-updates',
    '--lr',
    '0.01',
    '--weight-decay',
    '1e-4',
]
MODELS = ['resnet18_nam', 'resnet18', 'resnet18_nam:nam_weighting=mean']  # (a), (b), (c)
SEEDS = (0, 1, 2)
FIELDS = ['model', 'seed', 'epochs', 'top1', 'top5', 'best_top1', 'penalty_p', 'recipe', 'start', 'train_minutes']
FIELDS += ['device', 'date', 'timm_nam']


def run_one(model: str, seed: int, data_dir: str, start: Path, runs_dir: Path, workers: int) -> dict:
    name, model_kwargs = split_spec(model)
    recipe = ' '.join(RECIPE)
    slug = model.replace(':', '__').replace('=', '-')
    out = runs_dir / f'{slug}_s{seed}_{hashlib.sha1(recipe.encode()).hexdigest()[:8]}'
    cmd = [sys.executable, '-m', 'lab.train', '-m', name, '--data-dir', data_dir, '-o', str(out)]
    cmd += ['--seed', str(seed), '--workers', str(workers), '--initial-checkpoint', str(start), *RECIPE]
    if model_kwargs:
        cmd += ['--model-kwargs', *(f'{k}={v!r}' for k, v in model_kwargs.items())]
    if (out / 'last_state.pt').is_file():
        cmd += ['--resume', str(out)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
    metrics = json.loads((out / 'metrics.json').read_text())
    args = json.loads((out / 'args.json').read_text())
    return {
        'model': model,
        'seed': seed,
        'epochs': len(metrics),
        'top1': round(metrics[-1]['val_top1'], 3),
        'top5': round(metrics[-1]['val_top5'], 3),
        'best_top1': round(max(r['val_top1'] for r in metrics), 3),
        'penalty_p': args['penalty_p'],
        'recipe': recipe,
        'start': str(start),
        'train_minutes': round(sum(r['epoch_time_s'] for r in metrics) / 60, 2),
        'device': device_label(args.get('device_used', '')),
        'date': time.strftime('%Y-%m-%d'),
        'timm_nam': timm_nam.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True)
    p.add_argument('--start', required=True, help="the trained plain network's lab.train run directory")
    p.add_argument('--runs-dir', default='runs/nam_finetune')
    p.add_argument('--csv', default='results/nam_finetune/runs.csv')
    p.add_argument('--seeds', type=int, nargs='+', default=list(SEEDS))
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--list', action='store_true')
    args = p.parse_args()
    csv_path = Path(args.csv)
    done = set()
    if csv_path.is_file():
        with open(csv_path) as f:
            done = {(r['model'], int(r['seed'])) for r in csv.DictReader(f)}
    todo = [(m, s) for s in args.seeds for m in MODELS if (m, s) not in done]
    print(f'{len(todo)} runs to do', flush=True)
    if args.list:
        print('\n'.join(f'{m} seed {s}' for m, s in todo))
        return
    start = Path(args.start).resolve()
    for model, seed in todo:
        row = run_one(model, seed, args.data_dir, start, Path(args.runs_dir), args.workers)
        append_row(csv_path, row, FIELDS)
        print(f'{model} seed {seed}: top-1 {row["top1"]:.2f}', flush=True)


if __name__ == '__main__':
    main()
