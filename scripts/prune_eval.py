"""What does pruning NAM's least important channels cost? Zero a fraction of each NAM channel gate's output
channels — those with the smallest |γ| (the paper's importance) or a random draw of the same size — and measure
top-1 on the full validation split.

    python scripts/prune_eval.py DATA_ROOT RUN_DIR [RUN_DIR ...] [--fractions 0.1 0.3] [--draws 2] [--csv OUT.csv]

Zeroing a gate's output channel removes that channel of the block's residual branch (what channel pruning of the
branch's last convolution would remove). If |γ| ranks channels by importance, the smallest-|γ| rows cost less than
the random ones. The unpruned row must reproduce the run's own final top-1 (printed side by side).
"""

import argparse
import contextlib
import csv
import json
from pathlib import Path
from typing import Dict, Iterator, Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from timm_nam.layers import NAMChannel
from timm_nam.training.checkpoint import create_model_from_checkpoint
from timm_nam.training.data import build_datasets
from timm_nam.training.loop import evaluate

FIELDS = ['run', 'order', 'fraction', 'draw', 'pruned_channels', 'total_channels', 'top1', 'top5']


def channel_masks(
    model: nn.Module, fraction: float, order: str, generator: Optional[torch.Generator] = None
) -> Dict[str, torch.Tensor]:
    """Per NAM channel gate, a 0/1 mask over its channels with ``round(fraction·C)`` zeros: the smallest |γ|
    (``order='smallest'``) or a random choice (``order='random'``, drawn from ``generator``)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f'fraction must be in [0, 1], got {fraction}')
    if order not in ('smallest', 'random'):
        raise ValueError(f"order must be 'smallest' or 'random', got {order!r}")
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, NAMChannel):
            scale = m.bn.weight.detach().abs()
            k = round(fraction * scale.numel())
            idx = scale.argsort()[:k] if order == 'smallest' else torch.randperm(scale.numel(), generator=generator)[:k]
            mask = torch.ones_like(scale)
            mask[idx] = 0
            masks[name] = mask
    if not masks:
        raise ValueError(f'{type(model).__name__} has no NAM channel gates to prune')
    return masks


@contextlib.contextmanager
def pruned(model: nn.Module, masks: Dict[str, torch.Tensor]) -> Iterator[nn.Module]:
    """The model with each masked gate's output multiplied by its mask (channel dim 1), for the block."""
    modules = dict(model.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda mod, inp, out, m=mask: out * m.view(1, -1, *([1] * (out.dim() - 2))))
        for name, mask in masks.items()
    ]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data_root')
    p.add_argument('runs', nargs='+')
    p.add_argument('--fractions', type=float, nargs='+', default=[0.1, 0.3])
    p.add_argument('--draws', type=int, default=2, help='random masks per fraction (generator seeds 0..draws-1)')
    p.add_argument('--batch-size', type=int, default=256)
    p.add_argument('--workers', type=int, default=2)
    p.add_argument('--csv', type=Path)
    args = p.parse_args()
    rows = []
    for run in args.runs:
        model, _ = create_model_from_checkpoint(run)
        cfg = json.loads((Path(run) / 'args.json').read_text())
        _, val, _ = build_datasets(args.data_root, '', cfg['recipe']['aug'], cfg['recipe']['img_size'], cfg['model'])
        loader = DataLoader(val, batch_size=args.batch_size, num_workers=args.workers)
        total = sum(m.bn.weight.numel() for m in model.modules() if isinstance(m, NAMChannel))
        recorded = json.loads((Path(run) / 'metrics.json').read_text())[-1]['val_top1']

        def measure(order, fraction, draw, masks):
            with torch.no_grad(), pruned(model, masks):
                r = evaluate(model, loader, torch.device('cpu'), contextlib.nullcontext, channels_last=False)
            row = dict(
                run=Path(run).name,
                order=order,
                fraction=fraction,
                draw=draw,
                pruned_channels=int(sum((m == 0).sum() for m in masks.values())),
                total_channels=total,
                top1=round(r['top1'], 3),
                top5=round(r['top5'], 3),
            )
            print(row, flush=True)
            rows.append(row)

        measure('none', 0.0, '', {})
        print(f'{Path(run).name}: unpruned top-1 {rows[-1]["top1"]:.3f}, at the end of training {recorded:.3f}')
        for fraction in args.fractions:
            measure('smallest', fraction, '', channel_masks(model, fraction, 'smallest'))
            for draw in range(args.draws):
                g = torch.Generator().manual_seed(draw)
                measure('random', fraction, draw, channel_masks(model, fraction, 'random', g))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)


if __name__ == '__main__':
    main()
