"""Summarize the transfer study (``results/transfer/runs.csv``, ``gates.csv``): per backbone and regime, each arm's
final top-1 (mean ± std over seeds) and its difference from the plain fine-tune with Welch's 95 % CI, Welch's and the
paired-by-seed p-value and the paired p-value Holm-corrected over the arms of that backbone and regime; NAM against
its constant-0.5 control; what each arm costs (seconds per epoch and peak memory against plain, in the same runs);
what the gates did. Writes summary.md and top1.png beside the CSV and the ``<!-- transfer-table -->`` block of the
given docs.

    python -m lab.summarize_transfer [--csv results/transfer/runs.csv] [--docs MODEL_CARD.md]
"""

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

from lab.summarize_study import compare_top1, fmt_mean_std
from lab.transfer_study import ARMS, BACKBONES, REGIMES

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

DOC_BLOCK = re.compile(r'<!-- transfer-table -->\n.*?<!-- /transfer-table -->', re.S)
ARM_TEXT = {
    'plain': 'plain fine-tune',
    'nam': "NAM, add_nam's placement, paper's penalty",
    'nam_every': 'NAM in every block',
    'nam_mean': "NAM, weighting='mean'",
    'nam_p0': 'NAM without the penalty',
    'half': 'constant 0.5 at NAM sites (control)',
}


def read_rows(path: Path) -> list:
    if not path.is_file():
        return []
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def holm(pvalues: dict) -> dict:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), keyed as given; None stays None."""
    known = sorted((p, k) for k, p in pvalues.items() if p is not None)
    out, running = dict.fromkeys(pvalues), 0.0
    for i, (p, k) in enumerate(known):
        running = max(running, min(1.0, (len(known) - i) * p))
        out[k] = running
    return out


def cells(rows) -> dict:
    """(backbone, regime) -> arm -> its rows, in the study's order."""
    out = defaultdict(lambda: defaultdict(list))
    order = {a: i for i, a in enumerate(ARMS)}
    for r in sorted(rows, key=lambda r: order.get(r['arm'], 99)):
        out[r['backbone'], r['regime']][r['arm']].append(r)
    keys = sorted(out, key=lambda k: (_index(BACKBONES, k[0]), _index(list(REGIMES), k[1])))
    return {k: dict(out[k]) for k in keys}


def _index(seq, item) -> int:
    return list(seq).index(item) if item in seq else len(seq)


def _p(value) -> str:
    return 'n/a' if value is None else f'{value:.3f}'


def _ratio(rows, plain_rows, column: str) -> str:
    """Median over the seeds both ran of this arm's ``column`` over the plain run's."""
    plain = {r['seed']: float(r[column]) for r in plain_rows if r.get(column)}
    ratios = [float(r[column]) / plain[r['seed']] for r in rows if r.get(column) and plain.get(r['seed'])]
    return f'{statistics.median(ratios):.2f}×' if ratios else 'n/a'


def cell_lines(backbone: str, regime: str, arms: dict) -> list:
    plain = arms.get('plain', [])
    others = {a: rs for a, rs in arms.items() if a != 'plain'}
    comparisons = {a: compare_top1(rs, plain) for a, rs in others.items()} if plain else {}
    adjusted = holm({a: c['p_paired'] for a, c in comparisons.items()})
    images = arms[next(iter(arms))][0]['train_images']
    lines = [
        f'### {backbone}, {regime} ({images} training images, {arms[next(iter(arms))][0]["epochs"]} epochs)',
        '',
        '| arm | seeds | top-1 | Δ vs plain | 95 % CI (Welch) | p (Welch) | p (paired) | p (paired, Holm) '
        '| s/epoch vs plain | peak memory vs plain |',
        '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for arm, rs in arms.items():
        c = comparisons.get(arm)
        if c is None:
            diff = ci = p = pp = ph = '—'
        else:
            diff = f'{c["diff"]:+.2f}'
            ci = 'n/a' if c['lo'] is None else f'[{c["lo"]:+.2f}, {c["hi"]:+.2f}]'
            p, pp, ph = _p(c['p']), _p(c['p_paired']), _p(adjusted[arm])
        cost = (
            ('—', '—') if arm == 'plain' else (_ratio(rs, plain, 'seconds_per_epoch'), _ratio(rs, plain, 'peak_rss_mb'))
        )
        lines.append(
            f'| {ARM_TEXT.get(arm, arm)} (`{arm}`) | {len(rs)} | {fmt_mean_std([r["top1"] for r in rs])} | {diff} '
            f'| {ci} | {p} | {pp} | {ph} | {cost[0]} | {cost[1]} |'
        )
    if 'nam' in arms and 'half' in arms:
        c = compare_top1(arms['nam'], arms['half'])
        lines += ['', f'NAM against its control (what the gate adds to the doubled norm): {c["diff"]:+.2f} points, '
                  f'p = {_p(c["p"])} (Welch), {_p(c["p_paired"])} (paired).']  # fmt: skip
    plain_s = [float(r['seconds_per_epoch']) for r in plain]
    if plain_s:
        lines += ['', f'Plain: {statistics.median(plain_s):.0f} s per epoch (median).']
    return lines + ['']


def gate_lines(gates) -> list:
    """Per backbone, regime and arm: how many gates moved off their start, and how their scales ended."""
    if not gates:
        return []
    groups = defaultdict(list)
    for g in gates:
        groups[g['backbone'], g['regime'], g['arm']].append(g)
    lines = [
        '| backbone | regime | arm | gates (all seeds) | moved off the start | median scale / start (range of gates) '
        '| scales grown | scales near 0 |',
        '|---|---|---|---:|---:|---|---:|---:|',
    ]
    for (backbone, regime, arm), gs in groups.items():
        moved = sum(float(g['max_ratio']) > 1.01 or float(g['min_ratio']) < 0.99 for g in gs)
        ratios = [float(g['median_ratio']) for g in gs]
        grew = statistics.mean(float(g['grew']) for g in gs)
        zero = statistics.mean(float(g['near_zero']) for g in gs)
        lines.append(
            f'| {backbone} | {regime} | `{arm}` | {len(gs)} | {moved / len(gs):.0%} | '
            f'{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) | {grew:.1%} | {zero:.1%} |'
        )
    return lines


def plot(groups: dict, out: Path) -> None:
    backbones = [b for b in BACKBONES if any(k[0] == b for k in groups)] or sorted({k[0] for k in groups})
    regimes = [r for r in REGIMES if any(k[1] == r for k in groups)]
    fig, axes = plt.subplots(
        len(backbones), len(regimes), figsize=(4.2 * len(regimes), 3.4 * len(backbones)), squeeze=False
    )
    for i, backbone in enumerate(backbones):
        for j, regime in enumerate(regimes):
            ax = axes[i][j]
            arms = groups.get((backbone, regime), {})
            plain = [float(r['top1']) for r in arms.get('plain', [])]
            if plain:
                ax.axhspan(min(plain), max(plain), color='tab:blue', alpha=0.12, label='plain, seed range')
            for k, (arm, rs) in enumerate(arms.items()):
                values = [float(r['top1']) for r in rs]
                color = 'tab:blue' if arm == 'plain' else 'tab:gray' if arm == 'half' else 'tab:red'
                ax.scatter([k] * len(values), values, color=color, alpha=0.6, s=16)
                std = statistics.stdev(values) if len(values) > 1 else 0
                ax.errorbar(k + 0.2, statistics.mean(values), yerr=std, fmt='D', ms=4, color='black', capsize=3)
            ax.set_xticks(range(len(arms)), list(arms), rotation=35, ha='right', fontsize=8)
            ax.set_title(f'{backbone}, {regime}', fontsize=10)
            if j == 0:
                ax.set_ylabel('val top-1 (%), final epoch')
    fig.suptitle('Fine-tuning from ImageNet weights on Imagenette: each seed (dots), mean ± std', fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def fill_doc(path: Path, block: str) -> None:
    text = path.read_text()
    if not DOC_BLOCK.search(text):
        raise SystemExit(f'{path}: no <!-- transfer-table --> ... <!-- /transfer-table --> block to fill')
    path.write_text(DOC_BLOCK.sub(lambda _: f'<!-- transfer-table -->\n{block}\n<!-- /transfer-table -->', text))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--csv', type=Path, default=Path('results/transfer/runs.csv'))
    p.add_argument('--docs', nargs='*', default=['MODEL_CARD.md'])
    args = p.parse_args(argv)
    rows = read_rows(args.csv)
    if not rows:
        raise SystemExit(f'{args.csv}: no runs yet')
    groups = cells(rows)
    tables = []
    for (backbone, regime), arms in groups.items():
        tables += cell_lines(backbone, regime, arms)
    recipes = sorted({(r['regime'], r['recipe']) for r in rows})
    machines = sorted({r['machine'] for r in rows})
    versions = sorted({r['timm_nam'] for r in rows})
    text = [
        '# Transfer study: summary (generated by lab/summarize_transfer.py)',
        '',
        f'{len(rows)} runs; final-epoch top-1 on the 3,925 Imagenette validation photos. Δ: mean of the arm minus '
        "mean of the plain fine-tune; CI and first p from Welch's t-test over seeds, the second from the paired t-test "
        'over the seeds both ran (a seed fixes the subset, the data order and the head), Holm-corrected over the arms '
        'of each table. Costs are medians over seeds of the ratio to the plain run of the same seed.',
        '',
        *tables,
        '## What the gates did',
        '',
        'Each gate of each NAM run against the scale the conversion started it at (`lab.gate_start`): a gate moved if '
        "its channels' median scale changed by more than 1 % or any channel grew.",
        '',
        *gate_lines(read_rows(args.csv.parent / 'gates.csv')),
        '',
        '## Runs',
        '',
        *[f'- {regime}: `{recipe}`' for regime, recipe in recipes],
        f'- code versions: {", ".join(versions)}; machines: {"; ".join(machines)}',
    ]
    (args.csv.parent / 'summary.md').write_text('\n'.join(text) + '\n')
    plot(groups, args.csv.parent / 'top1.png')
    print('\n'.join(text))
    for doc in args.docs:
        fill_doc(Path(doc), '\n'.join(tables).rstrip())


if __name__ == '__main__':
    main()
