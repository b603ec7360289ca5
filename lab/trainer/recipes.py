"""Named training recipes for ``python -m lab.train``; every field can be overridden by a flag."""

from dataclasses import dataclass, field, fields, replace
from typing import Tuple


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int  # global batch per optimizer step (split over processes and accumulation steps)
    lr: float
    weight_decay: float
    opt: str = 'sgd'
    momentum: float = 0.9
    filter_bias_and_bn: bool = True  # False: weight decay on every parameter
    sched: str = 'cosine'
    decay_milestones: Tuple[int, ...] = ()
    decay_rate: float = 0.1
    warmup_epochs: int = 0
    sched_on_updates: bool = False  # step the lr schedule (warmup included) every optimizer step, not every epoch
    smoothing: float = 0.0
    img_size: int = 224
    aug: str = 'imagenet'  # 'cifar': random crop with padding + flip; 'imagenet': timm's train transform
    seed: int = 42
    description: str = field(default='', compare=False)


RECIPES = {
    # The authors' CIFAR-100 script (Christian-lyc/NAM): torch SGD with momentum 0.9 (not Nesterov: timm's 'sgd' is
    # Nesterov, 'momentum' is plain), lr 0.1, wd 5e-4 on all params, batch 128, 200 epochs, lr x0.2 at 60/120/160, crop
    # 32 pad 4 + flip, seed 1234. (Their script normalized with CIFAR-10's mean/std by mistake; we use CIFAR-100's.)
    'cifar': Recipe(
        epochs=200,
        batch_size=128,
        lr=0.1,
        weight_decay=5e-4,
        opt='momentum',
        filter_bias_and_bn=False,
        sched='multistep',
        decay_milestones=(60, 120, 160),
        decay_rate=0.2,
        img_size=32,
        aug='cifar',
        seed=1234,
        description="the NAM authors' CIFAR-100 recipe",
    ),
    # A conventional ImageNet-style SGD recipe on Recipe's defaults (the paper gives none for MobileNetV2/ImageNet).
    'imagenet': Recipe(
        epochs=100,
        batch_size=256,
        lr=0.1,
        weight_decay=1e-4,
        warmup_epochs=5,
        smoothing=0.1,
        description='ImageNet-style: SGD, cosine schedule with warmup, label smoothing',
    ),
}

RECIPE_FIELDS = tuple(f.name for f in fields(Recipe) if f.name != 'description')


def get_recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f'Unknown recipe {name!r}; choose from {sorted(RECIPES)}')
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})
