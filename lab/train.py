"""The seeded study trainer's command line (``python -m lab.train``, from a checkout): what ``python -m lab.train`` was
before 0.2. The study scripts run it; users train with timm's own train.py (README)."""

import argparse
import ast
import sys
from typing import List, Optional


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
    from timm_nam.penalty import parse_penalty

    try:
        return parse_penalty(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cmd_train(args) -> int:
    from .trainer import TrainConfig, TrainingDivergedError, get_recipe, train
    from .trainer.recipes import RECIPE_FIELDS

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
        initial_checkpoint=args.initial_checkpoint,
    )
    try:
        rows = train(cfg)
    except TrainingDivergedError as e:  # the run, not its input, went wrong; the message says what to try
        print(f'lab.train: error: {e}', file=sys.stderr)
        return 1
    if rows:
        best = max(rows, key=lambda r: r['val_top1'])
        print(
            f'best val top1 {best["val_top1"]:.2f} (top5 {best["val_top5"]:.2f}) at epoch {best["epoch"] + 1}; '
            f'final top1 {rows[-1]["val_top1"]:.2f}; outputs in {cfg.output}'
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .trainer.recipes import RECIPES

    p = argparse.ArgumentParser(
        prog='python -m lab.train',
        description='The seeded study trainer: train any timm-nam or timm model on an ImageFolder directory '
        '(<root>/train|val/<class>/...) or torch/cifar100 with the NAM sparsity penalty, exactly resumable. Runs '
        'under torchrun (DDP).',
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
    p.add_argument(
        '--initial-checkpoint',
        help="start from these weights (a .safetensors file or a lab.train run directory): a plain network's, "
        'converted exactly when --model is its NAM form (timm_nam.load_plain_weights)',
    )
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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _cmd_train(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: say what is wrong, no traceback
        print(f'lab.train: error: {e}', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
