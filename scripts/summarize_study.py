"""Summarize ``results/imagenette_study/runs.csv``: mean ± std of top-1/top-5 per model, params, FLOPs, speed,
a markdown table (summary.md) and a plot (top1.png).

    python scripts/summarize_study.py [--csv results/imagenette_study/runs.csv]
"""
import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def mean_std(values):
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float('nan'))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--csv', default='results/imagenette_study/runs.csv')
    args = p.parse_args()
    csv_path = Path(args.csv)
    rows = list(csv.DictReader(open(csv_path)))
    groups = defaultdict(list)
    for r in rows:
        groups[(r['family'], r['model'], r['recipe'])].append(r)
    lines = ['| family | model | seeds | top-1 (mean ± std) | top-5 (mean ± std) | params | FLOPs @64 px | train img/s |',
             '|---|---|---:|---:|---:|---:|---:|---:|']
    plot = defaultdict(list)
    for (family, model, recipe), rs in sorted(groups.items()):
        t1, s1 = mean_std(r['top1'] for r in rs)
        t5, s5 = mean_std(r['top5'] for r in rs)
        speed = statistics.mean(float(r['train_img_s']) for r in rs)
        lines.append(f"| {family} | `{model}` | {len(rs)} | {t1:.2f} ± {s1:.2f} | {t5:.2f} ± {s5:.2f} | "
                     f"{int(rs[0]['params']) / 1e6:.2f}M | {float(rs[0]['flops_g']):.3f}G | {speed:.0f} |")
        plot[family].append((model, [float(r['top1']) for r in rs]))
    text = '\n'.join(lines) + '\n'
    (csv_path.parent / 'summary.md').write_text(text)
    print(text)
    fig, axes = plt.subplots(1, len(plot), figsize=(6 * len(plot), 4), squeeze=False)
    for ax, (family, items) in zip(axes[0], sorted(plot.items())):
        for i, (model, vals) in enumerate(items):
            ax.scatter([i] * len(vals), vals, alpha=0.7)
            ax.errorbar(i, statistics.mean(vals), yerr=statistics.stdev(vals) if len(vals) > 1 else 0, fmt='_',
                        color='black', capsize=6)
        ax.set_xticks(range(len(items)), [m for m, _ in items], rotation=30, ha='right', fontsize=8)
        ax.set_ylabel('val top-1 (%)')
        ax.set_title(f'{family}, Imagenette 64 px, per seed')
    fig.tight_layout()
    fig.savefig(csv_path.parent / 'top1.png', dpi=120)


if __name__ == '__main__':
    main()
