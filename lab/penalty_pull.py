"""How far does NAM's sparsity penalty alone move a scale? A scale γ = 1 (a batch norm's initial weight) trained with
the penalty's gradient p·sign(γ) and nothing else, under a recipe's optimizer (momentum, and the weight-decay rule for
norm weights) and lr schedule, stepped as the training loop steps them.

    python -m lab.penalty_pull --recipe imagenet --img-size 64 --epochs 10 --warmup-epochs 1 --sched-on-updates \
        --lr 0.05 --weight-decay 1e-4 --steps-per-epoch 147 --penalty 1e-4 1e-3 1e-2

Set beside a trained model's scales (``timm-nam sparsity RUN_DIR``), it tells how much of their movement came from
the penalty and how much from the task.
"""

import argparse

import torch
import torch.nn as nn

from lab.trainer.loop import create_lr_scheduler, create_optimizer
from lab.trainer.recipes import Recipe, get_recipe


def penalty_only_scale(recipe: Recipe, steps_per_epoch: int, p: float) -> float:
    """γ after ``recipe`` when its only gradient is the penalty's p·sign(γ), starting from 1."""
    holder = nn.BatchNorm1d(1)  # a norm weight, so the optimizer applies the recipe's weight-decay rule for γ
    optimizer = create_optimizer(holder, recipe)
    scheduler, num_epochs = create_lr_scheduler(optimizer, recipe, steps_per_epoch)
    gamma, step = holder.weight, 0
    for epoch in range(num_epochs):
        for _ in range(steps_per_epoch):
            optimizer.zero_grad()
            gamma.grad = p * torch.sign(gamma.detach())  # the bias has no gradient, so the optimizer skips it
            optimizer.step()
            step += 1
            scheduler.step_update(step)
        scheduler.step(epoch + 1)
    return gamma.item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--recipe', default='imagenet')
    p.add_argument('--steps-per-epoch', type=int, required=True, help='optimizer steps per epoch (images // batch)')
    p.add_argument('--penalty', type=float, nargs='+', default=[1e-4])
    for flag, kind in [
        ('--epochs', int),
        ('--lr', float),
        ('--weight-decay', float),
        ('--warmup-epochs', int),
        ('--img-size', int),
        ('--batch-size', int),
    ]:
        p.add_argument(flag, type=kind)
    p.add_argument('--sched-on-updates', action='store_true', default=None)
    args = p.parse_args()
    recipe = get_recipe(
        args.recipe,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        img_size=args.img_size,
        batch_size=args.batch_size,
        sched_on_updates=args.sched_on_updates,
    )
    print('| p | γ after the penalty alone (from 1) |')
    print('|---:|---:|')
    for value in args.penalty:
        gamma = round(penalty_only_scale(recipe, args.steps_per_epoch, value), 4) + 0.0  # no '-0.0000'
        print(f'| {value:g} | {gamma:.4f} |')


if __name__ == '__main__':
    main()
