"""The Imagenette comparison of NAM against its baselines, run through ``python -m lab.train``; resumable.

Every (model, seed) run appends one row to ``results/imagenette_study/runs.csv``; rows already there are skipped,
so the study can be run in pieces. ``lab/summarize_study.py`` turns the rows into mean ± std tables and a plot.

    python -m lab.imagenette_study --data-dir ../shared/data/imagenette2-224            # everything missing
    python -m lab.imagenette_study --data-dir ... --family mobilenetv2 --max-runs 2     # a slice
    python -m lab.imagenette_study --data-dir ... --models mobilenetv2_100_nam mobilenetv2_100 --list

One recipe per family; NAM models get the paper's penalty (1e-3 MobileNetV2, 1e-4 ResNet), baselines none.
- mobilenetv2, resnet18 (CPU scale, the default): 64 px, 10 epochs, batch 64, SGD cosine with 1 warmup epoch stepped
  per update, label smoothing 0.1.
- resnet50_cifar (GPU only, chosen by name): Table 1's models (CIFAR-stem ResNet-50) under the authors' CIFAR recipe
  (momentum SGD lr 0.1, wd 5e-4 on all parameters, batch 128, padded crop + flip) on Imagenette at 160 px, SHORTENED
  to 4 epochs at lr 0.1 / 0.02 / 0.004 / 0.0008 (theirs: 200 epochs on CIFAR-100 at 32 px, x0.2 from 30/60/80 %)
  to keep one seed of all five to minutes on one GPU: at 160 px the CIFAR stem costs ~33 GFLOPs per image, ~8x
  ResNet-50 at 224 px; one seed of all five took 12 minutes on an H200, and NAM spatial needs more than 83 GiB at
  batch 128 (not an 80-GB H100). An early-training comparison, labelled as such; it cannot confirm or refute Table 1.

    python -m lab.imagenette_study --data-dir ... --family resnet50_cifar --seeds 1 --workers 12 --max-runs 2
"""

import argparse
import ast
import csv
import hashlib
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import timm_nam
from timm_nam.flops import count_flops

# --sched-on-updates: with per-epoch warmup, seed 2 collapsed for every model (results/imagenette_study/README.md);
# rows made without it stay in runs.csv as their own recipe group.
CPU_COMMON = [
    '--recipe',
    'imagenet',
    '--img-size',
    '64',
    '-b',
    '64',
    '--epochs',
    '10',
    '--warmup-epochs',
    '1',
    '--sched-on-updates',
]
FAMILIES = {  # a family's args are its whole recipe: the string that groups its rows in runs.csv
    'mobilenetv2': dict(
        models=[
            'mobilenetv2_100',
            'mobilenetv2_100_se',
            'mobilenetv2_100_bam',
            'mobilenetv2_100_cbam',
            'mobilenetv2_100_nam',
            'mobilenetv2_100_nam_chsp',
        ],
        args=CPU_COMMON + ['--lr', '0.03', '--weight-decay', '4e-5'],
    ),
    'resnet18': dict(
        models=[
            'resnet18',
            'resnet18_se',
            'resnet18_cbam',
            'resnet18_nam',
            'resnet18_half',  # the control: NAM's initial gate, constant
            'resnet18_simam',  # NAM's parameter-free peer
            'resnet18_nam_sp',
            # NAM variants (opt-in layer options, see timm_nam.NAMChannel): a model name and its kwargs
            'resnet18_nam:nam_weighting=mean',
            'resnet18_nam:nam_grad_through_weights=True',
        ],
        args=CPU_COMMON + ['--lr', '0.05', '--weight-decay', '1e-4'],
    ),
    'resnet50_cifar': dict(
        models=[
            'resnet50_cifar',
            'resnet50_cifar_se',
            'resnet50_cifar_cbam',
            'resnet50_cifar_nam',
            'resnet50_cifar_nam_sp',
        ],
        args=[
            '--recipe',
            'cifar',
            '--img-size',
            '160',
            '--epochs',
            '4',
            '--decay-milestones',
            '1',
            '2',
            '3',
            '--amp',
            '--amp-dtype',
            'bfloat16',
            '--channels-last',
        ],
        gpu=True,
    ),
}
CPU_FAMILIES = [name for name, fam in FAMILIES.items() if not fam.get('gpu')]
SEEDS = (0, 1, 2)
FIELDS = [
    'family',
    'model',
    'seed',
    'recipe',
    'top1',
    'top5',
    'best_top1',
    'params',
    'flops_g',
    'train_img_s',
    'train_minutes',
    'penalty_p',
    'device',
    'date',
    'timm_nam',
]


def split_spec(spec: str):
    """'name:k=v,k=v' -> ('name', {'k': literal v, ...}): a registered model with constructor kwargs (``--model-kwargs``
    of lab.train); the whole spec is the row's model."""
    name, _, options = spec.partition(':')
    kwargs = {}
    for item in filter(None, options.split(',')):
        key, _, value = item.partition('=')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def recipe_string(family: str) -> str:
    return ' '.join(FAMILIES[family]['args'])


def done_runs(csv_path: Path) -> set:
    if not csv_path.is_file():
        return set()
    with open(csv_path) as f:
        return {(r['model'], int(r['seed']), r['recipe']) for r in csv.DictReader(f)}


def append_row(csv_path: Path, row: dict, fields=FIELDS) -> None:
    new = not csv_path.is_file()
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if new:
            writer.writeheader()
        writer.writerow(row)


def host_cpu() -> str:
    """The processor's model name, so throughput from different machines is not mistaken for a model effect."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label(device: str) -> str:
    """'cpu (<model name>)' or 'cuda:0 (<GPU name>)': rows from different machines must say which."""
    if device.startswith('cuda') and torch.cuda.is_available():
        return f'{device} ({torch.cuda.get_device_name(torch.device(device))})'
    return f'cpu ({host_cpu()})' if device == 'cpu' else device


def run_dir(runs_dir: Path, model: str, seed: int, recipe: str) -> Path:
    """A run's directory; the recipe's hash in the name: a run of another recipe is never resumed as this one."""
    slug = model.replace(':', '__').replace('=', '-').replace(',', '_')
    return runs_dir / f'{slug}_s{seed}_{hashlib.sha1(recipe.encode()).hexdigest()[:8]}'


def run_one(family: str, model: str, seed: int, data_dir: str, runs_dir: Path, workers: int) -> dict:
    name, model_kwargs = split_spec(model)
    out = run_dir(runs_dir, model, seed, recipe_string(family))
    cmd = [
        sys.executable,
        '-m',
        'lab.train',
        '-m',
        name,
        '--data-dir',
        data_dir,
        '-o',
        str(out),
        '--seed',
        str(seed),
        '--workers',
        str(workers),
        *FAMILIES[family]['args'],
    ]
    if model_kwargs:
        cmd += ['--model-kwargs', *(f'{k}={v!r}' for k, v in model_kwargs.items())]
    if (out / 'last_state.pt').is_file():
        cmd += ['--resume', str(out)]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])  # python -m lab.train
    return study_row(out, family, model, seed, recipe_string(family))


def study_row(out: Path, family: str, model: str, seed: int, recipe: str) -> dict:
    """The study's row of the finished run in ``out`` (a lab.train run directory)."""
    name, model_kwargs = split_spec(model)
    metrics = json.loads((out / 'metrics.json').read_text())
    args = json.loads((out / 'args.json').read_text())
    img_size = args['recipe']['img_size']
    kwargs = {'img_size': img_size} if timm.get_pretrained_cfg_value(name, 'fixed_input_size') else {}
    net = timm.create_model(name, num_classes=args['num_classes'], **kwargs, **model_kwargs)
    final = metrics[-1]
    return {
        'family': family,
        'model': model,
        'seed': seed,
        'recipe': recipe,
        'top1': round(final['val_top1'], 3),
        'top5': round(final['val_top5'], 3),
        'best_top1': round(max(r['val_top1'] for r in metrics), 3),
        'params': sum(p.numel() for p in net.parameters()),
        'flops_g': round(count_flops(net, (3, img_size, img_size)).paper_flops / 1e9, 4),
        'train_img_s': round(sum(r['img_per_s'] for r in metrics) / len(metrics), 1),
        'train_minutes': round(sum(r['epoch_time_s'] for r in metrics) / 60, 2),
        'penalty_p': args['penalty_p'],
        'device': device_label(args.get('device_used', '')),
        'date': time.strftime('%Y-%m-%d'),
        'timm_nam': timm_nam.__version__,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data-dir', required=True, help='Imagenette ImageFolder root (imagenette2-224)')
    p.add_argument('--runs-dir', default='runs/imagenette_study', help='where run directories go (not committed)')
    p.add_argument('--csv', default='results/imagenette_study/runs.csv')
    p.add_argument(
        '--family',
        choices=list(FAMILIES),
        nargs='+',
        default=CPU_FAMILIES,
        help=f'default: {CPU_FAMILIES}; GPU-only families run when named',
    )
    p.add_argument('--seeds', type=int, nargs='+', default=list(SEEDS))
    p.add_argument(
        '--models',
        nargs='+',
        help='only these models, run in this order within each seed (default: every model of the chosen families)',
    )
    p.add_argument('--max-runs', type=int, help='stop after this many new runs')
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--list', action='store_true', help='print the runs still to do and exit')
    args = p.parse_args()
    csv_path, runs_dir = Path(args.csv), Path(args.runs_dir)
    family_of = {m: fam for fam in args.family for m in FAMILIES[fam]['models']}
    unknown = sorted(set(args.models or ()) - set(family_of))
    if unknown:
        p.error(f'--models {unknown} not in families {args.family}; choose from {list(family_of)}')
    gpu_only = [fam for fam in args.family if FAMILIES[fam].get('gpu')]
    if gpu_only and not args.list and not torch.cuda.is_available():
        p.error(f'--family {gpu_only} is sized for a GPU (hours per run on a CPU) and no CUDA device is available')
    done = done_runs(csv_path)
    todo = [
        (family_of[m], m, s)
        for s in args.seeds
        for m in (args.models or family_of)
        if (m, s, recipe_string(family_of[m])) not in done
    ]
    print(f'{len(todo)} runs to do' + (f', doing {args.max_runs}' if args.max_runs else ''), flush=True)
    if args.list:
        print('\n'.join(f'{model} seed {seed}' for _, model, seed in todo))
        return
    for fam, model, seed in todo[: args.max_runs]:
        row = run_one(fam, model, seed, args.data_dir, runs_dir, args.workers)
        append_row(csv_path, row)
        print(f'{model} seed {seed}: top-1 {row["top1"]:.2f} top-5 {row["top5"]:.2f}', flush=True)


if __name__ == '__main__':
    main()
