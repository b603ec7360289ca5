"""The ``timm-nam`` command (also ``python -m timm_nam``).

timm-nam            same as ``timm-nam tables``
timm-nam tables     print the paper's Tables 1-4 recomputed from the models (no data needed)
timm-nam sparsity   per-layer distribution of NAM's scales in a model trained with timm's train.py, with a plot
timm-nam export     a model trained with timm's train.py in Hugging Face Hub form (safetensors, config.json, card)
timm-nam publish    upload an export to the Hub (--dry-run: list what would be uploaded, offline)

Training goes through timm's own train.py (README); the seeded study trainer lives in the repository's lab/.
"""

import argparse
import sys
from typing import List, Optional

__all__ = ['main']


def _cmd_tables(args) -> int:
    from .tables import TABLE1, TABLE2, measure_rows, overhead_rows, render_tables

    table1, table2 = measure_rows(TABLE1), measure_rows(TABLE2)
    text = render_tables(table1, table2, overhead_rows())
    print(text)
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text)
    mismatches = [m['row'].label for m in table1 + table2 if not (m['params_ok'] and m['flops_ok'])]
    if mismatches:
        print(f'Rows that do not match the paper: {", ".join(mismatches)}', file=sys.stderr)
        return 1
    return 0


def _cmd_sparsity(args) -> int:
    from pathlib import Path

    from .sparsity import plot_stats, render_stats, scale_stats, write_stats
    from .train_run import create_model_from_run, read_run

    run = read_run(args.run)
    model = create_model_from_run(run, ema=args.ema)
    rows = scale_stats(model, args.thresholds)
    name = run.model_name
    print(f'{name} from {run.checkpoint}: |scale| of every NAM layer\n')
    print(render_stats(rows, args.thresholds))
    out_dir = Path(args.output or run.directory)
    write_stats(rows, out_dir, args.thresholds)
    plot = out_dir / 'sparsity.png'
    plot_stats(rows, plot, title=f'{name}: {run.checkpoint.name}')
    print(f'\nwrote {out_dir / "sparsity.csv"}, {out_dir / "sparsity.json"} and {plot}')
    return 0


_RUN_HELP = (
    "the output directory of timm's train.py (it stands for its model_best.pth.tar, else its last.pth.tar) or a "
    'checkpoint file in it'
)


def _add_sparsity_parser(sub) -> None:
    p = sub.add_parser('sparsity', help="distribution of NAM's scales (γ, λ) in a trained model, with a plot")
    p.add_argument('run', help=_RUN_HELP)
    p.add_argument('--ema', action='store_true', help='the EMA weights of the checkpoint')
    p.add_argument(
        '--thresholds',
        type=float,
        nargs='+',
        default=[1e-3, 1e-2, 1e-1],
        help='report the fraction of |scale| below each',
    )
    p.add_argument('--output', '-o', help="directory for sparsity.csv/.json/.png (default: the run's)")
    p.set_defaults(func=_cmd_sparsity)


def _cmd_export(args) -> int:
    from .hub import export_run

    out = export_run(args.run, args.out_dir, tag=args.tag, dataset_name=args.dataset_name, ema=args.ema)
    for f in sorted(out.iterdir()):
        print(f'{f}  ({f.stat().st_size:,} bytes)')
    return 0


def _cmd_publish(args) -> int:
    from .hub import default_repo_id, publish

    repo_id = args.repo_id or default_repo_id(args.dir)
    plan = publish(args.dir, repo_id, dry_run=args.dry_run, token=args.token, private=args.private)
    verb = 'would upload' if args.dry_run else 'uploaded'
    print(f'{verb} to https://huggingface.co/{repo_id}:')
    for f in plan:
        print(f'  {f["path"]}  {f["bytes"]:,} bytes  sha256 {f["sha256"]}')
    return 0


def _add_hub_parsers(sub) -> None:
    p = sub.add_parser('export', help="export a model trained with timm's train.py in Hugging Face Hub form")
    p.add_argument('run', help=_RUN_HELP)
    p.add_argument('out_dir', help='directory to write model.safetensors, config.json and README.md to')
    p.add_argument('--tag', required=True, help='pretrained tag, e.g. imagenette_r64 (the Hub repo is <model>.<tag>)')
    p.add_argument('--dataset-name', help="dataset name for the card (default: the data directory's name)")
    p.add_argument('--ema', action='store_true', help='export the EMA weights of the checkpoint')
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser('publish', help='upload an export directory to the Hugging Face Hub')
    p.add_argument('dir', help='an export directory')
    p.add_argument('repo_id', nargs='?', help="Hub repo id (default: the export's hf_hub_id)")
    p.add_argument('--dry-run', action='store_true', help='list what would be uploaded; no network')
    p.add_argument('--token', help='Hub token (default: huggingface_hub login or HF_TOKEN)')
    p.add_argument('--private', action='store_true')
    p.set_defaults(func=_cmd_publish)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='timm-nam', description='NAM (Normalization-based Attention Module) for timm.'
    )
    sub = parser.add_subparsers(dest='command')
    tables = sub.add_parser('tables', help="print the paper's Tables 1-4 (params, FLOPs, overheads)")
    tables.add_argument('--output', '-o', help='also write the markdown to this file')
    tables.set_defaults(func=_cmd_tables)
    _add_sparsity_parser(sub)
    _add_hub_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(['tables'] + list(argv if argv is not None else sys.argv[1:]))
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what is wrong, no traceback
        print(f'timm-nam {args.command}: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
