"""Compare lab.train runs that differ in the sparsity penalty: accuracy, scale sparsity, plots.

    python -m lab.summarize_penalty_runs RUN_DIR [RUN_DIR ...] --out results/imagenette_penalty

For each run directory (written by ``python -m lab.train``) it copies metrics.csv, computes the NAM scale statistics
of last.safetensors (``timm-nam sparsity``) and writes summary.md plus curves.png (validation top-1 per epoch)
and scales.png (distribution of |γ| and |λ| per run).
"""

import argparse
import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lab.trainer.checkpoint import create_model_from_checkpoint  # noqa: E402
from timm_nam.sparsity import plot_stats, scale_stats, write_stats  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('runs', nargs='+')
    p.add_argument('--out', required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, curves, scales = [], {}, {}
    for run in map(Path, args.runs):
        run_args = json.loads((run / 'args.json').read_text())
        metrics = json.loads((run / 'metrics.json').read_text())
        label = f'p={run_args["penalty_p"]:g}'
        dest = out / run.name
        dest.mkdir(exist_ok=True)
        for f in ('metrics.csv', 'metrics.json', 'args.json'):
            shutil.copy(run / f, dest / f)
        model, _ = create_model_from_checkpoint(run / 'last.safetensors')
        rows = scale_stats(model)
        write_stats(rows, dest)
        plot_stats(rows, dest / 'sparsity.png', title=f'{run_args["model"]}, {label}, after {len(metrics)} epochs')
        best = max(metrics, key=lambda r: r['val_top1'])
        vals = {
            k: torch.tensor([v for r in rows if r['kind'] == k for v in r['values']]) for k in ('channel γ', 'pixel λ')
        }
        summary.append((label, run, metrics[-1], best, vals, sum(r['epoch_time_s'] for r in metrics)))
        curves[label] = [r['val_top1'] for r in metrics]
        scales[label] = vals

    lines = [
        '| run | final top-1 | final top-5 | best top-1 (epoch) | median |γ| | γ < 0.01 | median |λ| | λ < 0.01 '
        '| train time |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for label, run, final, best, vals, seconds in summary:
        g, l_ = vals['channel γ'], vals['pixel λ']
        lines.append(
            f'| {label} (`{run.name}`) | {final["val_top1"]:.2f} | {final["val_top5"]:.2f} | {best["val_top1"]:.2f} '
            f'({best["epoch"] + 1}) | {g.median():.4f} | {(g < 0.01).float().mean() * 100:.1f}% | '
            + (f'{l_.median():.4f} | {(l_ < 0.01).float().mean() * 100:.1f}%' if l_.numel() else '— | —')
            + f' | {seconds / 60:.1f} min |'
        )
    (out / 'summary.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, marker='o', label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel('val top-1 (%)')
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / 'curves.png', dpi=120)
    plt.close(fig)

    kinds = [k for k in ('channel γ', 'pixel λ') if any(v[k].numel() for v in scales.values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for label, vals in scales.items():
            ax.hist(vals[kind].numpy(), bins=60, alpha=0.6, label=label)
        ax.set_xlabel(f'|{kind.split()[-1]}|')
        ax.set_ylabel('count')
        ax.set_title(f'NAM {kind} after training')
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / 'scales.png', dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    main()
