"""Summarize ``results/imagenette_study/runs.csv``: mean ± std of top-1/top-5 per model, params, FLOPs, speed,
NAM against every baseline of its family and the controls (``_half``, ``_simam``) against the plain network
(difference of mean top-1, Welch 95 % CI and p-value, paired-by-seed p-value), a markdown table (summary.md), a plot
(top1.png), and the same tables between the ``<!-- study-table -->`` markers of MODEL_CARD.md, so the docs never
quote numbers by hand.

    pip install -e ".[study]"      # scipy, for the t-tests
    python -m lab.summarize_study [--csv results/imagenette_study/runs.csv] [--docs MODEL_CARD.md]
"""

import argparse
import csv
import re
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib
from scipy import stats

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

DOC_BLOCK = re.compile(r'<!-- study-table -->\n.*?<!-- /study-table -->', re.S)


def mean_std(values):
    values = [float(v) for v in values]
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else float('nan'))


def fmt_mean_std(values) -> str:
    mean, std = mean_std(values)
    return f'{mean:.2f}' if len(values) < 2 else f'{mean:.2f} ± {std:.2f}'


def is_nam(model: str) -> bool:
    return '_nam' in model


def group_runs(rows) -> dict:
    """(family, model, recipe) -> its rows, in first-seen order (the study's model order)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r['family'], r['model'], r['recipe'])].append(r)
    return dict(groups)


def recipe_labels(groups) -> dict:
    """(family, recipe) -> the family's name in the tables, numbered by recipe where a family ran more than one."""
    by_family = defaultdict(list)
    for family, _, recipe in groups:
        if recipe not in by_family[family]:
            by_family[family].append(recipe)
    return {
        (fam, recipe): fam if len(recipes) == 1 else f'{fam}, recipe {i}'
        for fam, recipes in by_family.items()
        for i, recipe in enumerate(recipes, start=1)
    }


def recipe_legend(groups) -> list:
    return [f'- {label}: `{recipe}`' for (_, recipe), label in recipe_labels(groups).items()]


def model_lines(groups) -> list:
    lines = [
        '| family | model | seeds | top-1 (mean ± std) | top-5 (mean ± std) | params | FLOPs | train img/s |',
        '|---|---|---:|---:|---:|---:|---:|---:|',
    ]
    labels = recipe_labels(groups)
    for (family, model, recipe), rs in groups.items():
        lines.append(
            f'| {labels[family, recipe]} | `{model}` | {len(rs)} | '
            f'{fmt_mean_std([r["top1"] for r in rs])} | {fmt_mean_std([r["top5"] for r in rs])} | '
            f'{int(rs[0]["params"]) / 1e6:.2f}M | {float(rs[0]["flops_g"]):.3f}G{at_size(recipe)} | {speed_cell(rs)} |'
        )
    return lines


def at_size(recipe: str) -> str:
    """' @64 px' from the recipe's --img-size: families differ in resolution, and FLOPs grow with its square."""
    size = re.search(r'--img-size (\d+)', recipe)
    return f' @{size[1]} px' if size else ''


def speed_cell(rows) -> str:
    """Mean training img/s per kind of machine ('83 (CPU)', '1633 (GPU)'): a GPU row is 20x a CPU row, so a mean
    over both would say nothing."""
    by_kind = defaultdict(list)
    for r in rows:
        device = r.get('device') or ''
        kind = 'GPU' if device.startswith('cuda') else 'CPU' if device.startswith('cpu') else ''
        by_kind[kind].append(float(r['train_img_s']))
    return ', '.join(f'{statistics.mean(v):.0f}' + (f' ({kind})' if kind else '') for kind, v in by_kind.items())


def paired_pvalue(rows_a, rows_b) -> str:
    """Paired t-test over the seeds both models ran: a seed fixes the data order and the initialization up to the
    first module that differs, and at this scale it moves every model together, so pairing removes that share."""
    p = compare_top1(rows_a, rows_b)['p_paired']
    return 'n/a' if p is None else f'{p:.3f}'


def compare_top1(rows, other_rows) -> dict:
    """Mean final top-1 of ``rows`` minus that of ``other_rows``: the difference, Welch's 95 % CI and p-value, and the
    paired t-test's p-value over the seeds both ran (None where too few seeds)."""
    a, b = [float(r['top1']) for r in rows], [float(r['top1']) for r in other_rows]
    out = dict(
        diff=statistics.mean(a) - statistics.mean(b), lo=None, hi=None, p=None, p_paired=None, n=(len(a), len(b))
    )
    if min(len(a), len(b)) >= 2:
        res = stats.ttest_ind(a, b, equal_var=False)
        ci = res.confidence_interval(0.95)
        out.update(lo=ci.low, hi=ci.high, p=float(res.pvalue))
    top1_b = {r['seed']: float(r['top1']) for r in other_rows}
    pairs = [(float(r['top1']), top1_b[r['seed']]) for r in rows if r['seed'] in top1_b]
    if len(pairs) >= 2:
        out['p_paired'] = float(stats.ttest_rel(*zip(*pairs)).pvalue)
    return out


def is_control(model: str) -> bool:
    """The controls of NAM's study: the constant-0.5 branch (``_half``) and its parameter-free peer (``_simam``)."""
    return model.endswith(('_half', '_simam'))


COMPARISON_HEADER = (
    '| family | model | vs | Δ top-1 (model − other) | 95 % CI (Welch) | p (Welch t) | p (paired t, by seed) | seeds |',
    '|---|---|---|---:|---:|---:|---:|---:|',
)


def comparison_line(label: str, model: str, rows, other: str, other_rows) -> str:
    c = compare_top1(rows, other_rows)
    ci = 'n/a' if c['lo'] is None else f'[{c["lo"]:+.2f}, {c["hi"]:+.2f}]'
    pval = 'n/a' if c['p'] is None else f'{c["p"]:.3f}'
    paired = 'n/a' if c['p_paired'] is None else f'{c["p_paired"]:.3f}'
    seeds = f'{c["n"][0]} vs {c["n"][1]}'
    return f'| {label} | `{model}` | `{other}` | {c["diff"]:+.2f} | {ci} | {pval} | {paired} | {seeds} |'


def comparison_lines(groups) -> list:
    """Every NAM model against every non-NAM model of the same family and recipe, a NAM variant ('model:kwargs')
    also against the model it varies, and each control against the family's plain network (its first non-NAM
    model), on final top-1."""
    lines = list(COMPARISON_HEADER)
    labels = recipe_labels(groups)
    for (family, nam, recipe), nam_rows in groups.items():
        if not is_nam(nam):
            continue
        for (fam2, other, recipe2), other_rows in groups.items():
            if fam2 != family or recipe2 != recipe or (is_nam(other) and other != nam.partition(':')[0]):
                continue
            if other != nam:
                lines.append(comparison_line(labels[family, recipe], nam, nam_rows, other, other_rows))
    for (family, control, recipe), rows in groups.items():
        if is_control(control):
            plain = next(m for f, m, r in groups if f == family and r == recipe and not is_nam(m))
            lines.append(comparison_line(labels[family, recipe], control, rows, plain, groups[family, plain, recipe]))
    return lines if len(lines) > 2 else ['(No NAM model has a finished run yet.)']


def fill_doc(path: Path, block: str) -> None:
    """Replace the text between the study-table markers of ``path`` with ``block``."""
    text = path.read_text()
    if not DOC_BLOCK.search(text):
        raise SystemExit(f'{path}: no <!-- study-table --> ... <!-- /study-table --> block to fill')
    path.write_text(DOC_BLOCK.sub(lambda _: f'<!-- study-table -->\n{block}\n<!-- /study-table -->', text, count=1))


def plot_top1(groups, out: Path) -> None:
    families, labels = defaultdict(list), recipe_labels(groups)
    for (family, model, recipe), rs in groups.items():
        families[labels[family, recipe]].append((model, [float(r['top1']) for r in rs]))
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4), squeeze=False)
    for ax, (family, items) in zip(axes[0], families.items()):
        for i, (model, vals) in enumerate(items):
            ax.scatter([i] * len(vals), vals, alpha=0.7, color='tab:red' if is_nam(model) else 'tab:blue')
            ax.errorbar(
                i + 0.15,
                statistics.mean(vals),
                yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
                fmt='D',
                markersize=4,
                color='black',
                capsize=4,
            )
        ax.set_xticks(range(len(items)), [m for m, _ in items], rotation=30, ha='right', fontsize=8)
        ax.set_ylabel('val top-1 (%), final epoch')
        ax.set_title(f'{family}: seeds (dots), mean ± std', fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--csv', default='results/imagenette_study/runs.csv')
    p.add_argument(
        '--docs',
        nargs='*',
        default=['MODEL_CARD.md'],
        help='markdown files whose study-table block is rewritten (none: leave docs alone)',
    )
    args = p.parse_args(argv)
    csv_path = Path(args.csv)
    with open(csv_path) as f:
        groups = group_runs(csv.DictReader(f))
    if not groups:
        raise SystemExit(f'{csv_path}: no runs yet')
    tables = [
        'Recipes:',
        '',
        *recipe_legend(groups),
        '',
        *model_lines(groups),
        '',
        '**NAM against each baseline, and the controls against the plain network.** Δ is the difference of mean '
        "final top-1; the CI and first p-value come from Welch's two-sample t-test over seeds, the second from a "
        'paired t-test over the seeds both models ran (no correction for the number of comparisons).',
        '',
        *comparison_lines(groups),
    ]
    text = (
        '\n'.join(
            [
                '# Imagenette study: summary (generated by lab/summarize_study.py)',
                '',
                'Final-epoch validation accuracy (%), one row per model and recipe.',
                '',
                *tables,
            ]
        )
        + '\n'
    )
    (csv_path.parent / 'summary.md').write_text(text)
    print(text)
    plot_top1(groups, csv_path.parent / 'top1.png')
    for doc in args.docs:
        fill_doc(Path(doc), '\n'.join(tables))


if __name__ == '__main__':
    main()
