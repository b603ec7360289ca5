"""The ``timm-nam`` command (also ``python -m timm_nam``).

timm-nam            same as ``timm-nam tables``
timm-nam tables     print the paper's Tables 1-4 recomputed from the models (no data needed)
timm-nam train      train a model (ours or any timm model) with the NAM sparsity penalty
timm-nam sparsity   per-layer distribution of NAM's scales in a checkpoint, with a plot
timm-nam export     a checkpoint in Hugging Face Hub form (safetensors, config.json, model card)
timm-nam publish    upload an export to the Hub (--dry-run: list what would be uploaded, offline)
"""

import argparse
import ast
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


def _kv(text: str):
    """k=v with a Python literal value (like timm train.py's --model-kwargs)."""
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    key, value = text.split('=', 1)
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _penalty(text: str):
    from .penalty import parse_penalty

    try:
        return parse_penalty(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_train(args) -> int:
    from .training import TrainConfig, TrainingDivergedError, get_recipe, train
    from .training.recipes import RECIPE_FIELDS

    overrides = {k: getattr(args, k) for k in RECIPE_FIELDS if getattr(args, k, None) is not None}
    if 'decay_milestones' in overrides:
        overrides['decay_milestones'] = tuple(overrides['decay_milestones'])
    cfg = TrainConfig(
        model=args.model,
        data_dir=args.data_dir,
        output=args.output,
        recipe=get_recipe(args.recipe, **overrides),
        recipe_name=args.recipe,
        dataset=args.dataset,
        num_classes=args.num_classes,
        model_kwargs=dict(args.model_kwargs or []),
        nam_penalty=args.nam_penalty,
        amp=args.amp,
        amp_dtype=args.amp_dtype,
        channels_last=args.channels_last,
        compile=args.compile,
        model_ema=args.model_ema,
        model_ema_decay=args.model_ema_decay,
        grad_accum_steps=args.grad_accum_steps,
        workers=args.workers,
        resume=args.resume,
        device=args.device,
        limit_train_steps=args.limit_train_steps,
        drop_path_rate=args.drop_path,
    )
    try:
        rows = train(cfg)
    except TrainingDivergedError as e:  # the run, not its input, went wrong; the message says what to try
        print(f'timm-nam train: error: {e}', file=sys.stderr)
        return 1
    if rows:
        best = max(rows, key=lambda r: r['val_top1'])
        print(
            f'best val top1 {best["val_top1"]:.2f} (top5 {best["val_top5"]:.2f}) at epoch {best["epoch"] + 1}; '
            f'final top1 {rows[-1]["val_top1"]:.2f}; outputs in {cfg.output}'
        )
    return 0


def _add_train_parser(sub) -> None:
    from .training.recipes import RECIPES

    p = sub.add_parser(
        'train',
        help='train a model with the NAM sparsity penalty',
        description='Train any timm-nam or timm model on an ImageFolder directory '
        '(<root>/train|val/<class>/...) or torch/cifar100. Runs under torchrun (DDP).',
    )
    p.add_argument('--model', '-m', required=True, help='timm model name, e.g. mobilenetv2_nam or resnet50_cifar_nam')
    p.add_argument('--data-dir', required=True, help='dataset root')
    p.add_argument('--dataset', default='', help="'' for an ImageFolder root, or torch/cifar100 (torchvision layout)")
    p.add_argument('--output', '-o', required=True, help='run directory (checkpoints, metrics)')
    p.add_argument(
        '--recipe',
        default='imagenet',
        choices=sorted(RECIPES),
        help='; '.join(f'{k}: {v.description}' for k, v in RECIPES.items()),
    )
    g = p.add_argument_group('recipe overrides')
    g.add_argument('--epochs', type=int)
    g.add_argument('--batch-size', '-b', type=int, help='global batch per optimizer step')
    g.add_argument('--lr', type=float)
    g.add_argument('--weight-decay', type=float)
    g.add_argument('--opt')
    g.add_argument('--momentum', type=float)
    g.add_argument('--sched')
    g.add_argument(
        '--decay-milestones',
        type=int,
        nargs='+',
        help="multistep: the first epochs trained at each decayed lr (as PyTorch's MultiStepLR; "
        "timm's train.py decays one epoch earlier)",
    )
    g.add_argument('--decay-rate', type=float)
    g.add_argument('--warmup-epochs', type=int)
    g.add_argument(
        '--sched-on-updates',
        action='store_true',
        default=None,
        help="step the lr schedule every optimizer step (timm train.py's flag): a smooth warmup",
    )
    g.add_argument('--smoothing', type=float)
    g.add_argument('--img-size', type=int)
    g.add_argument('--aug', choices=['cifar', 'imagenet'])
    g.add_argument('--seed', type=int)
    p.add_argument('--num-classes', type=int, help='default: the number of classes in the data')
    p.add_argument('--model-kwargs', nargs='*', type=_kv, metavar='K=V')
    p.add_argument(
        '--nam-penalty',
        type=_penalty,
        help="p of the sparsity penalty: a number (0 = off) or 'paper' (1e-4 ResNet, 1e-3 MobileNet); default: the "
        "nam_penalty model kwarg if given, else 'paper'",
    )
    p.add_argument('--drop-path', type=float)
    p.add_argument('--amp', action='store_true', help='mixed precision (autocast; GradScaler for float16)')
    p.add_argument('--amp-dtype', default='bfloat16', choices=['bfloat16', 'float16'])
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--compile', action='store_true', help='torch.compile the model')
    p.add_argument('--model-ema', action='store_true')
    p.add_argument('--model-ema-decay', type=float, default=0.9998)
    p.add_argument('--grad-accum-steps', type=int, default=1)
    p.add_argument('--workers', '-j', type=int, default=2)
    p.add_argument('--resume', help='run directory (or its last.safetensors) to resume from')
    p.add_argument('--device', default='auto', help="'auto', 'cpu' or 'cuda'")
    p.add_argument('--limit-train-steps', type=int, help='at most this many optimizer steps per epoch (smoke runs)')
    p.set_defaults(func=_cmd_train)


def _cmd_sparsity(args) -> int:
    from pathlib import Path

    from .sparsity import plot_stats, render_stats, scale_stats, write_stats
    from .training.checkpoint import create_model_from_checkpoint, resolve_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    model, meta = create_model_from_checkpoint(checkpoint, args.model)
    rows = scale_stats(model, args.thresholds)
    print(f'{meta["model"]} from {checkpoint}: |scale| of every NAM layer\n')
    print(render_stats(rows, args.thresholds))
    out_dir = Path(args.output or checkpoint.parent)
    write_stats(rows, out_dir, args.thresholds)
    plot = out_dir / 'sparsity.png'
    plot_stats(rows, plot, title=f'{meta["model"]}: {checkpoint.name}')
    print(f'\nwrote {out_dir / "sparsity.csv"}, {out_dir / "sparsity.json"} and {plot}')
    return 0


def _add_sparsity_parser(sub) -> None:
    p = sub.add_parser('sparsity', help="distribution of NAM's scales (γ, λ) in a checkpoint, with a plot")
    p.add_argument(
        'checkpoint', help='a .safetensors checkpoint written by timm-nam train, or its run directory (its last)'
    )
    p.add_argument('--model', help='model name, if the checkpoint does not record it')
    p.add_argument(
        '--thresholds',
        type=float,
        nargs='+',
        default=[1e-3, 1e-2, 1e-1],
        help='report the fraction of |scale| below each',
    )
    p.add_argument('--output', '-o', help="directory for sparsity.csv/.json/.png (default: the checkpoint's)")
    p.set_defaults(func=_cmd_sparsity)


def _cmd_export(args) -> int:
    from .hub import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.out_dir, tag=args.tag, dataset_name=args.dataset_name)
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
    p = sub.add_parser('export', help='export a checkpoint in Hugging Face Hub form')
    p.add_argument(
        'checkpoint',
        help='best.safetensors or last.safetensors in a timm-nam train run directory, or the directory (last)',
    )
    p.add_argument('out_dir', help='directory to write model.safetensors, config.json and README.md to')
    p.add_argument('--tag', required=True, help='pretrained tag, e.g. imagenette_r64 (the Hub repo is <model>.<tag>)')
    p.add_argument('--dataset-name', help="dataset name for the card (default: the data directory's name)")
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
    _add_train_parser(sub)
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
