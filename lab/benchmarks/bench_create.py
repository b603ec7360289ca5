"""How long ``timm.create_model`` takes for each registered NAM model against its plain network: placing NAM traces
the network and runs it once on a small image, a cost its plain network does not have.

    python -m lab.benchmarks.bench_create [--repeats 5] [--processes 3] [--out results/benchmarks]

Each process builds every (NAM, plain) pair in turn, round-robin: the first build of each (``first``: a fresh
process, as train.py or a notebook pays it) and the median of ``--repeats`` later ones (``again``: the same network
built again in that process). Ratios are NAM over plain, per process, then the median over processes; written to
``create_model.md`` and ``create_model.csv`` with the machine, versions and date.
"""

import argparse
import csv
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

import timm_nam
from lab.imagenette_study import host_cpu

# one registered model per family and size, with the plain network it is built from
PAIRS = [
    ('resnet18_nam', 'resnet18'),
    ('resnet50_nam', 'resnet50'),
    ('resnet101_nam', 'resnet101'),
    ('mobilenetv2_100_nam', 'mobilenetv2_100'),
    ('efficientnet_b0_nam', 'efficientnet_b0'),
    ('efficientnet_lite0_nam', 'efficientnet_lite0'),
    ('regnety_008_nam', 'regnety_008'),
    ('resnet50_cifar_nam', 'resnet50'),
]


def _time(name: str) -> float:
    start = time.perf_counter()
    timm.create_model(name)
    return time.perf_counter() - start


def one_process(repeats: int) -> dict:
    """Seconds per build: the first, and the median of ``repeats`` more, for every model of ``PAIRS``."""
    torch.manual_seed(0)
    names = [n for pair in PAIRS for n in pair]
    first = {n: _time(n) for n in names}  # each network's first build in this process
    again = {n: [] for n in names}
    for _ in range(repeats):
        for n in names:
            again[n].append(_time(n))
    return {n: dict(first=first[n], again=statistics.median(again[n])) for n in names}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--processes', type=int, default=3)
    p.add_argument('--out', default='results/benchmarks')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(one_process(args.repeats)))
        return
    cmd = [sys.executable, '-m', 'lab.benchmarks.bench_create', '--worker', '--repeats', str(args.repeats)]
    runs = [
        json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        for _ in range(args.processes)
    ]
    rows = []
    for nam, plain in PAIRS:
        row = dict(model=nam, plain=plain)
        for kind in ('first', 'again'):
            row[f'{kind}_s'] = round(statistics.median(r[nam][kind] for r in runs), 3)
            row[f'plain_{kind}_s'] = round(statistics.median(r[plain][kind] for r in runs), 3)
            row[f'{kind}_ratio'] = round(statistics.median(r[nam][kind] / r[plain][kind] for r in runs), 2)
        rows.append(row)
    machine = f'{host_cpu()}, {torch.get_num_threads()} threads'
    stamp = (
        f'{datetime.date.today()}, timm-nam {timm_nam.__version__}, timm {timm.__version__}, torch {torch.__version__}'
    )
    out = Path(args.out)
    with open(out / 'create_model.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], 'machine', 'date'])
        writer.writeheader()
        writer.writerows(dict(r, machine=machine, date=str(datetime.date.today())) for r in rows)
    lines = [
        f'# timm.create_model: NAM models against their plain networks ({machine}; {stamp})',
        '',
        f'`python -m lab.benchmarks.bench_create --repeats {args.repeats} --processes {args.processes}`: seconds per '
        'build, median over processes; "first" is the first build of that network in a fresh process, "again" '
        'the median of the later ones.',
        '',
        '| model | plain | first: NAM / plain (s) | ratio | again: NAM / plain (s) | ratio |',
        '|---|---|---:|---:|---:|---:|',
    ]
    lines += [
        f'| `{r["model"]}` | `{r["plain"]}` | {r["first_s"]:.3f} / {r["plain_first_s"]:.3f} | {r["first_ratio"]:.2f}× '
        f'| {r["again_s"]:.3f} / {r["plain_again_s"]:.3f} | {r["again_ratio"]:.2f}× |'
        for r in rows
    ]
    (out / 'create_model.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
