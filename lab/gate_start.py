"""Do NAM's gates learn from the start the conversion gives them? Each gate's scales at the start of a fine-tune run by
timm's train.py (``--pretrained``: plain weights converted, every gate at its `timm_nam.convert.start_scale`) and at
its end.

    python -m lab.gate_start output/train/<run> [output/train/<run> ...] --out results/pretrained_conversion/finetune

Per run and gate: its width, the start scale s, the scales' median and range at the end relative to s, the share of
scales that grew against the penalty (|γ| > s) and the share the penalty took to about 0 (|γ| < s/10). At the start
every scale of a gate is s. Writes ``gates.csv`` and prints a summary.
"""

import argparse
import csv
from pathlib import Path

import torch

from timm_nam.convert import start_scale
from timm_nam.layers import NAMChannel, NAMSpatial
from timm_nam.train_run import create_model_from_run, read_run


def _gates(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (NAMChannel, NAMSpatial))}


def gate_rows(run_dir) -> list:
    """One row per gate of the run's model (``run_dir``: a train.py output directory or a checkpoint in it)."""
    run = read_run(run_dir)
    rows = []
    for name, gate in _gates(create_model_from_run(run)).items():
        s1 = gate.bn.weight.detach()
        s0 = torch.full_like(s1, start_scale(gate))  # where the conversion started every scale of the gate
        ratio = s1 / s0
        rows.append(
            dict(
                run=run.directory.name,
                gate=name,
                width=s0.numel(),
                start=round(s0[0].item(), 6),
                median_ratio=round(ratio.median().item(), 4),
                min_ratio=round(ratio.min().item(), 4),
                max_ratio=round(ratio.max().item(), 4),
                grew=round((s1.abs() > s0.abs()).float().mean().item(), 4),
                near_zero=round((s1.abs() < s0.abs() / 10).float().mean().item(), 4),
            )
        )
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+', help="output directories of timm's train.py")
    p.add_argument('--out', default='results/pretrained_conversion/finetune')
    args = p.parse_args()
    rows = [row for run in args.runs for row in gate_rows(run)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'gates.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for run in dict.fromkeys(r['run'] for r in rows):
        mine = [r for r in rows if r['run'] == run]
        largest = max(max(r['max_ratio'], -r['min_ratio']) for r in mine)
        moved = sum(abs(r['median_ratio'] - 1) > 0.01 or r['grew'] > 0 for r in mine)
        print(
            f'{run}: {len(mine)} gates, {moved} moved off their start; median scale / start '
            f'{min(r["median_ratio"] for r in mine):.3f} to {max(r["median_ratio"] for r in mine):.3f}, '
            f'largest {largest:.1f}; scales grown {min(r["grew"] for r in mine):.0%}'
            f'-{max(r["grew"] for r in mine):.0%}, near 0 {min(r["near_zero"] for r in mine):.0%}'
            f'-{max(r["near_zero"] for r in mine):.0%} of a gate'
        )


if __name__ == '__main__':
    main()
