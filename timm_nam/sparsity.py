"""How sparse did the penalty make NAM's scales? Per-layer statistics of γ (channel) and λ (pixel), and a plot."""

import csv
import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn as nn

from .layers import NAMChannel, NAMSpatial
from .models import model_name

__all__ = ['scale_stats', 'render_stats', 'plot_stats', 'write_stats']

DEFAULT_THRESHOLDS = (1e-3, 1e-2, 1e-1)


def scale_stats(model: nn.Module, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> List[Dict]:
    """One row per NAM layer: kind, size, |scale| distribution, fraction of |scale| below each threshold."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, (NAMChannel, NAMSpatial)):
            continue
        s = module.bn.weight.detach().abs().float().cpu()
        row = {
            'layer': name,
            'kind': 'channel γ' if isinstance(module, NAMChannel) else 'pixel λ',
            'n': s.numel(),
            'mean': s.mean().item(),
            'median': s.median().item(),
            'min': s.min().item(),
            'max': s.max().item(),
        }
        for t in thresholds:
            row[f'frac<{t:g}'] = (s < t).float().mean().item()
        row['values'] = s.tolist()
        rows.append(row)
    if not rows:
        raise ValueError(f'{model_name(model)} has no NAM layers')
    return rows


def _summary(rows: List[Dict], kind: str, thresholds) -> Dict:
    values = torch.tensor([v for r in rows if r['kind'] == kind for v in r['values']])
    out = {'layer': f'all {kind}', 'kind': kind, 'n': values.numel()}
    if values.numel():
        out.update(
            mean=values.mean().item(), median=values.median().item(), min=values.min().item(), max=values.max().item()
        )
        out.update({f'frac<{t:g}': (values < t).float().mean().item() for t in thresholds})
    return out


def render_stats(rows: List[Dict], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> str:
    cols = ['layer', 'kind', 'n', 'mean', 'median', 'min', 'max'] + [f'frac<{t:g}' for t in thresholds]
    lines = ['| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
    kinds = sorted({r['kind'] for r in rows})
    for r in rows + [_summary(rows, k, thresholds) for k in kinds]:
        cells = []
        for c in cols:
            v = r.get(c, '')
            cells.append(f'{v:.4g}' if isinstance(v, float) else str(v))
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def plot_stats(rows: List[Dict], path, title: str = '') -> None:
    """Box plots of log10|scale| per layer, one panel per kind (matplotlib, PNG)."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'timm-nam[plot]'") from e
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    kinds = [k for k in ('channel γ', 'pixel λ') if any(r['kind'] == k for r in rows)]
    fig, axes = plt.subplots(len(kinds), 1, figsize=(max(8, 0.45 * len(rows)), 3.6 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        sel = [r for r in rows if r['kind'] == kind]
        data = [torch.tensor(r['values']).clamp_min(1e-8).log10().numpy() for r in sel]
        ax.boxplot(data, showfliers=True, flierprops=dict(markersize=2))
        ax.set_xticks(range(1, len(sel) + 1), [r['layer'] for r in sel], rotation=75, fontsize=7)
        ax.set_ylabel(f'log10 |{kind.split()[-1]}|')
        ax.axhline(-2, color='grey', lw=0.8, ls='--')
        ax.set_title(f'{kind} per NAM layer')
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_stats(rows: List[Dict], out_dir, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = [{k: v for k, v in r.items() if k != 'values'} for r in rows]
    (out_dir / 'sparsity.json').write_text(json.dumps(plain, indent=1))
    with open(out_dir / 'sparsity.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(plain[0]))
        writer.writeheader()
        writer.writerows(plain)
