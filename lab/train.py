"""The seeded study trainer (``python -m lab.train``, from a checkout; ``timm-nam train`` before 0.2): trains a timm-nam
or timm model on an ImageFolder directory (<root>/train|val/<class>/...) or torch/cifar100 with the sparsity penalty,
exactly resumable, under torchrun too (DDP). The study scripts run it; users train with timm's train.py (README)."""

import argparse
import sys
from dataclasses import fields
from typing import List, Optional

from timm.utils import ParseKwargs

from timm_nam.penalty import parse_penalty

from .trainer import RECIPES, TrainConfig, TrainingDivergedError, get_recipe, train
from .trainer.recipes import RECIPE_FIELDS


def _key_value(text: str) -> str:
    if '=' not in text:
        raise argparse.ArgumentTypeError(f'expected key=value, got {text!r}')
    return text


def _penalty(text: str):
    try:
        return parse_penalty(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m lab.train', description=__doc__)
    p.add_argument('--model', '-m', required=True, help='timm model name, e.g. mobilenetv2_nam or resnet50_cifar_nam')
    p.add_argument('--data-dir', required=True, help='dataset root')
    p.add_argument('--dataset', default='', help="'' for an ImageFolder root, or torch/cifar100 (torchvision layout)")
    p.add_argument('--output', '-o', required=True, help='run directory (checkpoints, metrics)')
    recipes = '; '.join(f'{k}: {v.description}' for k, v in RECIPES.items())
    p.add_argument('--recipe', dest='recipe_name', default='imagenet', choices=sorted(RECIPES), help=recipes)
    g = p.add_argument_group('recipe overrides')
    g.add_argument('--epochs', type=int)
    g.add_argument('--batch-size', '-b', type=int, help='global batch per optimizer step')
    g.add_argument('--lr', type=float)
    g.add_argument('--weight-decay', type=float)
    g.add_argument('--opt')
    g.add_argument('--momentum', type=float)
    g.add_argument('--sched')
    milestones = "multistep: each decayed lr's first epoch (as PyTorch's MultiStepLR; timm's train.py: one earlier)"
    g.add_argument('--decay-milestones', type=int, nargs='+', help=milestones)
    g.add_argument('--decay-rate', type=float)
    g.add_argument('--warmup-epochs', type=int)
    on_updates = "step the lr schedule every optimizer step (timm train.py's flag): a smooth warmup"
    g.add_argument('--sched-on-updates', action='store_true', default=None, help=on_updates)
    g.add_argument('--smoothing', type=float)
    g.add_argument('--img-size', type=int)
    g.add_argument('--aug', choices=['cifar', 'imagenet'])
    g.add_argument('--seed', type=int)
    p.add_argument('--num-classes', type=int, help='default: the number of classes in the data')
    p.add_argument('--model-kwargs', nargs='*', type=_key_value, default={}, action=ParseKwargs, metavar='K=V')
    penalty = "p of the sparsity penalty: a number (0 = off) or 'paper' (1e-4 ResNet, 1e-3 MobileNet)"
    p.add_argument('--nam-penalty', type=_penalty, help=f'{penalty}; default: the nam_penalty model kwarg, else paper')
    p.add_argument('--drop-path', dest='drop_path_rate', type=float, metavar='RATE')
    start = 'start from these weights (a .safetensors file or a lab.train run directory)'
    p.add_argument('--initial-checkpoint', help=f"{start}: a plain network's, converted if --model is its NAM form")
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
    overrides = {k: getattr(args, k) for k in RECIPE_FIELDS if getattr(args, k, None) is not None}
    if 'decay_milestones' in overrides:
        overrides['decay_milestones'] = tuple(overrides['decay_milestones'])
    options = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != 'recipe'}
    try:
        rows = train(TrainConfig(recipe=get_recipe(args.recipe_name, **overrides), **options))
    except TrainingDivergedError as e:  # the run, not its input, went wrong; the message says what to try
        print(f'lab.train: error: {e}', file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:  # bad input: say what is wrong, no traceback
        print(f'lab.train: error: {e}', file=sys.stderr)
        return 2
    if rows:
        best = max(rows, key=lambda r: r['val_top1'])
        print(
            f'best val top1 {best["val_top1"]:.2f} (top5 {best["val_top5"]:.2f}) at epoch {best["epoch"] + 1}; '
            f'final top1 {rows[-1]["val_top1"]:.2f}; outputs in {args.output}'
        )
    return 0


if __name__ == '__main__':
    sys.exit(main())
