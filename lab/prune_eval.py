"""What does pruning NAM's least important channels cost? Zero a fraction of each NAM channel gate's output
channels — those with the smallest |γ| of the gate (the paper's importance), the smallest |γ| of the batch norm whose
output the gate takes (network slimming's criterion, which the plain network has as well) or a random draw of the
same size — and measure top-1 on the full validation split.

    python -m lab.prune_eval DATA_ROOT RUN_DIR [RUN_DIR ...] [--fractions 0.1 0.3] [--draws 2] [--csv OUT.csv]
        [--layers-csv LAYERS.csv]

Zeroing a gate's output channel removes that channel of the block's residual branch (what channel pruning of the
branch's last convolution would remove). If |γ| ranks channels by importance, the smallest-|γ| rows cost less than
the random ones; if it ranks them better than the network's own batch norm does, the gate adds information the
block did not have. The unpruned row must reproduce the run's own final top-1 (printed side by side).
``--layers-csv`` writes, per gate, its |γ| range, the gated norm's |γ| and how the two correlate.
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

from lab.trainer.checkpoint import create_model_from_checkpoint
from lab.trainer.data import build_datasets
from lab.trainer.loop import evaluate
from timm_nam.layers import NAMChannel, NormNAM

FIELDS = ['run', 'order', 'fraction', 'draw', 'pruned_channels', 'total_channels', 'top1', 'top5']
LAYER_FIELDS = [
    'run',
    'layer',
    'width',
    'gamma_min',
    'gamma_median',
    'gamma_max',
    'norm_gamma_median',
    'norm_gamma_below_0.05',
    'corr_gamma_norm_gamma',
]


ORDERS = ('smallest', 'norm', 'random')


def gated_norms(model: nn.Module) -> Dict[str, nn.Module]:
    """For each NAM channel gate, the batch norm whose output it gates: the norm it sits with (`NormNAM`)."""
    return {
        f'{n}.nam': m.norm for n, m in model.named_modules() if isinstance(m, NormNAM) and isinstance(m.nam, NAMChannel)
    }


def layer_scales(run: str, model: nn.Module, norms: Dict[str, nn.Module]) -> list:
    """Per NAM channel gate: its |γ| range, the gated norm's |γ| (median, share below 0.05) and their correlation."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, NAMChannel):
            gamma, norm_gamma = m.bn.weight.detach().abs(), norms[name].weight.detach().abs()
            rows.append(
                {
                    'run': run,
                    'layer': name,
                    'width': gamma.numel(),
                    'gamma_min': round(gamma.min().item(), 5),
                    'gamma_median': round(gamma.median().item(), 5),
                    'gamma_max': round(gamma.max().item(), 5),
                    'norm_gamma_median': round(norm_gamma.median().item(), 5),
                    'norm_gamma_below_0.05': round((norm_gamma < 0.05).float().mean().item(), 4),
                    'corr_gamma_norm_gamma': round(torch.corrcoef(torch.stack([gamma, norm_gamma]))[0, 1].item(), 3),
                }
            )
    return rows


def channel_masks(
    model: nn.Module,
    fraction: float,
    order: str,
    generator: Optional[torch.Generator] = None,
    norms: Optional[Dict[str, nn.Module]] = None,
) -> Dict[str, torch.Tensor]:
    """Per NAM channel gate, a 0/1 mask over its channels with ``round(fraction·C)`` zeros: the smallest |γ| of the
    gate (``order='smallest'``), of the batch norm it gates (``order='norm'``, from ``norms``, see ``gated_norms``)
    or a random choice (``order='random'``, drawn from ``generator``)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f'fraction must be in [0, 1], got {fraction}')
    if order not in ORDERS:
        raise ValueError(f'order must be one of {ORDERS}, got {order!r}')
    if order == 'norm' and norms is None:
        raise ValueError("order='norm' needs the gated norms (gated_norms(model))")
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, NAMChannel):
            scale = (norms[name] if order == 'norm' else m.bn).weight.detach().abs()
            k = round(fraction * scale.numel())
            idx = torch.randperm(scale.numel(), generator=generator)[:k] if order == 'random' else scale.argsort()[:k]
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
    p.add_argument('--layers-csv', type=Path)
    args = p.parse_args()
    rows, layer_rows = [], []
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

        norms = gated_norms(model)
        layer_rows += layer_scales(Path(run).name, model, norms)
        measure('none', 0.0, '', {})
        print(f'{Path(run).name}: unpruned top-1 {rows[-1]["top1"]:.3f}, at the end of training {recorded:.3f}')
        for fraction in args.fractions:
            measure('smallest', fraction, '', channel_masks(model, fraction, 'smallest'))
            measure('norm', fraction, '', channel_masks(model, fraction, 'norm', norms=norms))
            for draw in range(args.draws):
                g = torch.Generator().manual_seed(draw)
                measure('random', fraction, draw, channel_masks(model, fraction, 'random', g))
    for path, fields, content in [(args.csv, FIELDS, rows), (args.layers_csv, LAYER_FIELDS, layer_rows)]:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, 'w', newline='') as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(content)


if __name__ == '__main__':
    main()
