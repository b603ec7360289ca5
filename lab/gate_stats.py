"""What NAM computes in trained models: per NAM layer, the gate values sigmoid(z), the sigmoid's argument
z = w·BN(x) and the effective slopes w·γ, on val images.

    python -m lab.gate_stats DATA_ROOT RUN_DIR [RUN_DIR ...] [--images 10] [--out DIR] > gate_stats.md

Prints a per-run summary (markdown); with ``--out`` also writes ``gate_layers.csv`` (one row per layer and run) and
``gate_layers.png`` (gate spread and |w·γ| against the layer's width C). In eval mode a NAM gate is
``x·sigmoid(a·x + b)`` with per-channel (per-pixel) ``a, b`` folded from the batch norm (`NAMChannel.fuse`), so
``z = a·x + b`` exactly.
"""

import argparse
import csv
import statistics
from pathlib import Path

import torch
from timm.data import create_dataset, create_transform

from lab.trainer.checkpoint import create_model_from_checkpoint
from timm_nam.layers import NAMChannel, NAMSpatial

FIELDS = [
    'run',
    'layer',
    'kind',
    'width',
    'w_gamma_median',
    'z_std',
    'gate_min',
    'gate_max',
    'gate_std',
    'gate_p05',
    'gate_p50',
    'gate_p95',
    'moved',
]


def _quantiles(t: torch.Tensor, qs) -> list:
    t = t.flatten().float()
    if t.numel() > 1_000_000:  # torch.quantile's input limit; a strided sample is plenty
        t = t[:: t.numel() // 1_000_000 + 1]
    return [float(v) for v in torch.quantile(t, torch.tensor(qs))]


def layer_stats(run: str, model: torch.nn.Module, x: torch.Tensor) -> list:
    """One dict per NAM layer of ``model`` on the batch ``x``."""
    rows, inputs = [], {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (NAMChannel, NAMSpatial))}
    for name, m in layers.items():
        m.register_forward_hook(lambda mod, inp, out, name=name: inputs.__setitem__(name, inp[0].detach()))
    with torch.no_grad():
        model(x)
        for name, m in layers.items():
            gate = m.fuse()
            z = gate.a * inputs[name] + gate.b
            g = torch.sigmoid(z)
            w_gamma = (m.weights() * m.bn.weight).abs()
            p05, p50, p95 = _quantiles(g, [0.05, 0.5, 0.95])
            rows.append(
                dict(
                    run=run,
                    layer=name,
                    kind='channel' if isinstance(m, NAMChannel) else 'pixel',
                    width=m.bn.weight.numel(),
                    w_gamma_median=float(w_gamma.median()),
                    z_std=float(z.std()),
                    gate_min=float(g.min()),
                    gate_max=float(g.max()),
                    gate_std=float(g.std()),
                    gate_p05=p05,
                    gate_p50=p50,
                    gate_p95=p95,
                    moved=float(((g - 0.5).abs() > 0.1).float().mean()),  # share of gates outside 0.4-0.6
                )
            )
    return rows


def _plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r['run'] for r in rows))
    fig, (ax_gate, ax_w) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(runs):
        mine = [r for r in rows if r['run'] == run and r['kind'] == 'channel']
        idx = range(len(mine))
        color = f'C{i}'
        ax_gate.fill_between(idx, [r['gate_p05'] for r in mine], [r['gate_p95'] for r in mine], color=color, alpha=0.25)
        ax_gate.plot(idx, [r['gate_p50'] for r in mine], color=color, label=run)
        ax_w.scatter([r['width'] for r in mine], [r['w_gamma_median'] for r in mine], color=color, label=run, s=14)
    widths = sorted({r['width'] for r in rows if r['kind'] == 'channel'})
    ax_w.plot(widths, [1 / c for c in widths], 'k--', lw=1, label='1/C')
    ax_gate.axhline(0.5, color='k', lw=0.8)
    ax_gate.set(xlabel='NAM channel layer (input to output)', ylabel='gate sigmoid(z): 5-50-95 %', ylim=(0, 1))
    ax_w.set(xscale='log', yscale='log', xlabel='channels C', ylabel='median |w·γ| (slope of z in x̂)')
    ax_gate.legend(fontsize=7)
    ax_w.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('data_root')
    p.add_argument('runs', nargs='+')
    p.add_argument('--images', type=int, default=10)
    p.add_argument('--out', type=Path, help='folder for gate_layers.csv and gate_layers.png')
    args = p.parse_args()
    rows = []
    for run in args.runs:
        model, _ = create_model_from_checkpoint(run)
        model.eval()
        size = model.pretrained_cfg['input_size'][-1]
        ds = create_dataset('', root=args.data_root, split='val')
        ds.transform = create_transform(size, is_training=False)
        step = max(len(ds) // args.images, 1)
        x = torch.stack([ds[i * step][0] for i in range(args.images)])
        rows += layer_stats(Path(run).name, model, x)
    print('| run | gate | min | max | mean std within a layer | moved (mean over layers) | median \\|w·γ\\| |')
    print('|---|---|---:|---:|---:|---:|---:|')
    for run in dict.fromkeys(r['run'] for r in rows):
        for kind in ('channel', 'pixel'):
            mine = [r for r in rows if r['run'] == run and r['kind'] == kind]
            if mine:
                lo, hi = min(r['gate_min'] for r in mine), max(r['gate_max'] for r in mine)
                spread = statistics.mean(r['gate_std'] for r in mine)
                moved = statistics.mean(r['moved'] for r in mine)
                slope = statistics.median(r['w_gamma_median'] for r in mine)
                print(f'| {run} | {kind} | {lo:.4f} | {hi:.4f} | {spread:.4f} | {moved:.1%} | {slope:.4f} |')
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / 'gate_layers.csv', 'w', newline='') as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({k: (f'{v:.5g}' if isinstance(v, float) else v) for k, v in r.items()} for r in rows)
        _plot(rows, args.out / 'gate_layers.png')


if __name__ == '__main__':
    main()
