"""`add_nam` over timm's registry: where NAM is placed, how exactly each network converts, and what is refused.

    python -m lab.placement_sweep run --data-dir ../shared/data/imagenette2-224 --max-params 60
    python -m lab.placement_sweep summarize

``run`` takes every architecture timm registers (timm-nam's own models aside), one row each, appended to
``--out``/sweep.csv as it goes (a second run continues where the first stopped). An architecture without batch norm
is refused on its structure alone; one with more than ``--max-params`` million parameters is left out. Each other one
is built with random weights and the batch-norm states of the conversion tests (`tests.helpers.bn_states_`:
trained-like where every block is residual, randomised for the inverted-residual family), measured on real photos at
``--img-size`` px (its own size where it takes no other), then given NAM by `timm_nam.add_nam` with its defaults:

* ``rel_error``: the relative L2 difference of its logits from the plain network's, eval mode;
* ``sensitivity``: the same difference for the plain network when its input moves by 1e-3 of its spread (noise): a
  random network far more sensitive than a trained one (a trained ResNet or MobileNet moves by about 1e-4 to 1e-3)
  magnifies the conversion's first-order term as it magnifies the noise;
* ``trains``: one training step with the paper's penalty gives every gate's scale a gradient;
* ``misplaced`` / ``missing``: gates that are not where timm's own block modules say a residual branch ends, and
  such ends without a gate (`tests.helpers.placement_errors`, which reads the blocks' classes and flags, not the
  traced graph; both should be 0); empty where none of the network's blocks is one it reads (``read`` false).

``summarize`` writes sweep.md: one line per timm model family (the module timm registers it in), and the rows.
"""

import argparse
import csv
import signal
from collections import defaultdict
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import create_dataset, create_transform
from timm.models._registry import _model_to_module

import timm_nam
from tests.helpers import bn_states_, placement_errors
from timm_nam.models import MODEL_MODULES, NAMPlacementError

FIELDS = [
    'family', 'model', 'params_m', 'img_size', 'result', 'gates', 'rel_error', 'sensitivity', 'trains', 'read',
    'misplaced', 'missing', 'reason',
]  # fmt: skip
ERROR_BOUND = 2e-2


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def _photos(data_dir: str, count: int = 48) -> torch.Tensor:
    """Validation photos at 224 px with ImageNet's normalisation, spread over the split; resized per network."""
    transform = create_transform(224, crop_pct=1.0)
    ds = create_dataset('', root=data_dir, split='val', transform=transform)
    return torch.stack([ds[i][0] for i in range(0, len(ds), len(ds) // count)][:count])


def _refused(error: NAMPlacementError) -> dict:
    """A refusal's row: 'failed' where the network could not be analysed (torch.fx), 'refused' otherwise."""
    reason = str(error).partition(': ')[2]
    failed = reason.startswith(('torch.fx cannot trace', 'its traced graph fails'))
    return dict(result='failed' if failed else 'refused', reason=reason)


def _measure(name: str, photos: torch.Tensor, img_size: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    cfg = model.pretrained_cfg
    own, least = cfg['input_size'][-1], (cfg.get('min_input_size') or (0, 0))[-1]
    for size in [own] if cfg.get('fixed_input_size') else [max(img_size, least), own]:
        x = F.interpolate(photos, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
        try:
            with torch.no_grad():
                model.eval()(x[:1])
            break
        except (RuntimeError, AssertionError):  # too small for it
            continue
    img_size = size
    row = dict(img_size=img_size)
    try:
        bn_states_(model, x[16:])
    except NAMPlacementError:  # the states need the branches' norms: add_nam's refusal says why there are none
        pass
    with torch.no_grad():
        expected = model(x[:16])
        noise = torch.randn(x[:16].shape, generator=torch.Generator().manual_seed(1))
        noisy = model(x[:16] + 1e-3 * x[:16].std() * noise)
    row['sensitivity'] = f'{((noisy - expected).norm() / expected.norm()).item():.3g}'
    try:
        timm_nam.add_nam(model, img_size=img_size)
    except NAMPlacementError as e:
        return row | _refused(e)
    scales = timm_nam.nam_scales(model)
    with torch.no_grad():
        rel = ((model(x[:16]) - expected).norm() / expected.norm()).item()
    model.train()
    loss = timm_nam.NAMSparsityLoss(nn.CrossEntropyLoss(), model)(model(x[:8]), torch.arange(8) % 10)
    loss.backward()
    trains = all(s.grad is not None and s.grad.abs().sum() > 0 for s in scales)
    errors = placement_errors(model)
    misplaced, missing = errors or ([], [])
    ok = rel <= ERROR_BOUND and trains and not misplaced and not missing
    return row | dict(
        result='accepted' if ok else 'accepted, off',
        gates=len(scales),
        rel_error=f'{rel:.3g}',
        trains=trains,
        read=errors is not None,
        misplaced=len(misplaced) if errors is not None else '',
        missing=len(missing) if errors is not None else '',
        reason='' if ok else ' '.join(misplaced + missing)[:200],
    )


def cmd_run(args):
    out = Path(args.out) / 'sweep.csv'
    done = set()
    if out.exists():
        with open(out, newline='') as f:
            done = {row['model'] for row in csv.DictReader(f)}
    names = [n for n in timm.list_models(args.filter) if _model_to_module.get(n) not in MODEL_MODULES and n not in done]
    photos = _photos(args.data_dir)
    torch.set_num_threads(args.threads)
    signal.signal(signal.SIGALRM, _alarm)
    with open(out, 'a', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if not done:
            writer.writeheader()
        for name in names:
            row = dict(family=_model_to_module[name], model=name)
            try:
                try:
                    with torch.device('meta'):
                        meta = timm.create_model(name)
                except Exception:  # a network that computes something while it is built
                    meta = timm.create_model(name)
                params = sum(p.numel() for p in meta.parameters()) / 1e6
                row['params_m'] = f'{params:.2f}'
                if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in meta.modules()):
                    timm_nam.add_nam(meta)  # refused on its structure alone
                del meta
                if params > args.max_params:
                    row |= dict(result='left out', reason=f'more than {args.max_params:g}M parameters')
                else:
                    signal.alarm(args.timeout)
                    row |= _measure(name, photos, args.img_size)
            except NAMPlacementError as e:
                row |= _refused(e)
            except _Timeout:
                row |= dict(result='failed', reason=f'took more than {args.timeout} s')
            except Exception as e:
                row |= dict(result='failed', reason=f'{type(e).__name__}: {e}'.replace('\n', ' ')[:200])
            finally:
                signal.alarm(0)
            writer.writerow(row)
            f.flush()
            print({k: v for k, v in row.items() if v not in ('', None)}, flush=True)


def cmd_summarize(args):
    with open(Path(args.out) / 'sweep.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    families = defaultdict(list)
    for row in rows:
        families[row['family']].append(row)
    lines = [
        '| family | networks | accepted | read by blocks: misplaced, missing | error (median, max) | refused | failed '
        '| left out | why refused |',
        '|---|---:|---:|---|---|---:|---:|---:|---|',
    ]
    for family, members in sorted(families.items()):
        count = {r: sum(m['result'] == r for m in members) for r in ('accepted', 'refused', 'failed', 'left out')}
        off = sum(m['result'] == 'accepted, off' for m in members)
        errors = sorted(float(m['rel_error']) for m in members if m['rel_error'])
        error = f'{errors[len(errors) // 2]:.1e}, {errors[-1]:.1e}' if errors else ''
        reasons = sorted({m['reason'].split(';')[0].split(' (')[0] for m in members if m['result'] == 'refused'})
        accepted = f'{count["accepted"]}' + (f' (+{off} off)' if off else '')
        read = [m for m in members if m.get('read') == 'True']
        checked = f'{len(read)}: {_total(read, "misplaced")}, {_total(read, "missing")}' if read else ''
        lines.append(
            f'| {family} | {len(members)} | {accepted} | {checked} | {error} | {count["refused"]} | {count["failed"]} '
            f'| {count["left out"]} | {"; ".join(reasons)[:160]} |'
        )
    results = [r['result'] for r in rows]
    # the families NAM should go into: a network accepted, or one that could not be analysed (counted against)
    placed = {f: m for f, m in families.items() if any(r['result'].startswith(('accepted', 'failed')) for r in m)}
    measured = {f: [r for r in m if r['result'].startswith(('accepted', 'failed'))] for f, m in placed.items()}
    within = [f for f, m in measured.items() if all(r['result'] == 'accepted' for r in m)]
    errors = {f: sorted(float(r['rel_error']) for r in m if r['rel_error']) for f, m in placed.items()}
    typical = [f for f, e in errors.items() if e and e[len(e) // 2] <= ERROR_BOUND]

    def share(part):
        return f'{len(part)} ({100 * len(part) / max(len(placed), 1):.0f} %)'

    accepted = [r for r in rows if r['result'].startswith('accepted')]
    read = [r for r in accepted if r.get('read') == 'True']
    head = [
        f'{len(rows)} networks: {results.count("accepted")} accepted within {ERROR_BOUND:g}, '
        f'{results.count("accepted, off")} accepted above it (off), {results.count("refused")} refused, '
        f'{results.count("failed")} failed, {results.count("left out")} left out. {len(placed)} families have '
        'residual branches that end in a batch norm (a network accepted) or a network that could not be analysed; '
        f'in {share(within)} every such network is accepted within {ERROR_BOUND:g}, in {share(typical)} the median. '
        f"Of the {len(accepted)} accepted, {len(read)} have blocks that timm's block modules tell apart "
        f'(`tests.helpers.placement_errors`, independent of the placement): {_total(read, "misplaced")} gates '
        f'misplaced, {_total(read, "missing")} residual branch ends left without a gate.',
        '',
    ]
    lines = head + lines
    (Path(args.out) / 'sweep.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def _total(rows, column: str) -> int:
    return sum(int(r[column] or 0) for r in rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run')
    run.add_argument('--data-dir', required=True)
    run.add_argument('--filter', nargs='+', default='', help='timm.list_models patterns (default: all)')
    run.add_argument('--img-size', type=int, default=64)
    run.add_argument('--max-params', type=float, default=60.0, help='millions')
    run.add_argument('--timeout', type=int, default=300, help='seconds per network')
    run.add_argument('--threads', type=int, default=2)
    run.set_defaults(func=cmd_run)
    summarize = sub.add_parser('summarize')
    summarize.set_defaults(func=cmd_summarize)
    for q in (run, summarize):
        q.add_argument('--out', default='results/pretrained_conversion')
    args = p.parse_args()
    args.func(args)


if __name__ == '__main__':
    main()
