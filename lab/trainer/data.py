"""Data for ``python -m lab.train``: timm datasets and transforms, each sample's augmentation seeded from (seed, epoch,
index) and each epoch's order from (seed, epoch). So a resumed run sees exactly the data of an uninterrupted one, and N
processes under DDP see exactly the chunks one process sees with N accumulation steps."""

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Tuple

import numpy as np
import torch
from timm.data import create_dataset, create_transform, resolve_data_config
from timm.models import get_pretrained_cfg
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import transforms as T

TORCH_DATASETS = {'torch/cifar100': 'cifar-100-python', 'torch/cifar10': 'cifar-10-batches-py'}  # their folders


def check_data_dir(data_dir: str, dataset: str) -> None:
    """Clear errors for a missing directory or a layout the dataset cannot read."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f'Data directory {str(root)!r} does not exist')
    if dataset in TORCH_DATASETS:
        folder = root / TORCH_DATASETS[dataset]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{dataset} expects torchvision's layout: {folder} (extract the python-version tarball into {root}); "
                'no download is attempted'
            )
        return
    if dataset:
        raise ValueError(
            f'Unsupported dataset {dataset!r}: use an ImageFolder directory (no --dataset) or one of '
            f'{tuple(TORCH_DATASETS)}'
        )
    for split in ('train', 'val'):
        if not (root / split).is_dir() or not any(p.is_dir() for p in (root / split).iterdir()):
            raise FileNotFoundError(
                f'{root} is not an ImageFolder dataset: expected {root / split} with one sub-directory per class '
                f'(<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg)'
            )


def _transforms(aug: str, img_size: int, mean, std, crop_pct: float):
    if aug == 'cifar':
        normalize = [T.ToTensor(), T.Normalize(mean, std)]
        view = [T.Resize(img_size), T.CenterCrop(img_size)]  # identity on CIFAR's 32-px images at 32 px
        # the padded crop shifts the validation view; without `view` an ImageFolder image larger than img_size
        # would be cut to a small full-resolution patch, a different scale from validation. The padding is an
        # eighth of the size (CIFAR's 4 px at 32 px), so the shift stays as strong at any resolution.
        pad = max(1, round(img_size / 8))
        train = T.Compose([*view, T.RandomCrop(img_size, padding=pad), T.RandomHorizontalFlip(), *normalize])
        return train, T.Compose([*view, *normalize])
    if aug != 'imagenet':
        raise ValueError(f"Unknown augmentation {aug!r}; expected 'cifar' or 'imagenet'")
    train = create_transform(img_size, is_training=True, mean=mean, std=std, hflip=0.5, color_jitter=None)
    val = create_transform(img_size, is_training=False, mean=mean, std=std, crop_pct=crop_pct)
    return train, val


def build_datasets(data_dir: str, dataset: str, aug: str, img_size: int, model_name: str) -> Tuple[Dataset, ...]:
    """(train, val, num_classes) with train/eval transforms from the recipe and the model's mean/std."""
    check_data_dir(data_dir, dataset)
    cfg = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(model_name).to_dict())
    train_tf, val_tf = _transforms(aug, img_size, cfg['mean'], cfg['std'], cfg.get('crop_pct', 0.875))
    kwargs = dict(download=False) if dataset else {}
    train = create_dataset(dataset, root=data_dir, split='train', is_training=True, **kwargs)
    val = create_dataset(dataset, root=data_dir, split='validation' if dataset else 'val', **kwargs)
    train.transform, val.transform = train_tf, val_tf
    num_classes = len(getattr(train, 'classes', None) or train.reader.class_to_idx)
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f'{data_dir}: empty split (train {len(train)}, val {len(val)} images)')
    return train, val, num_classes


class SeededDataset(Dataset):
    """Wraps a dataset so each sample's random transform is seeded from (seed, epoch, index). The transforms draw from
    the global RNGs (torchvision's from torch's, timm's from Python's) and take no generator, so each item runs under
    the global RNGs seeded for it, and their states are put back afterwards: the model's own randomness (dropout,
    drop-path) is then the same whether items are loaded in this process or in worker processes."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with _seeded_rngs((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index):
            return self.dataset[index]


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's, Python's and numpy's global RNGs for the block and restore their states after it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def train_loader(dataset: SeededDataset, sampler: Sampler, workers: int, pin_memory: bool = False) -> DataLoader:
    """The training DataLoader. Its workers are not persistent on purpose: a persistent worker keeps the copy of
    the dataset it was started with, so ``SeededDataset.set_epoch`` would never reach it and every epoch would
    replay epoch 0's augmentation of each image. Workers started per epoch copy the current epoch."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory)


class GlobalBatchSampler(Sampler[List[int]]):
    """Yields this process's micro-batches of each global batch, in order. Each epoch is one permutation seeded from
    (seed, epoch); each global batch is split into ``world_size * accum_steps`` equal chunks, of which process ``rank``
    takes the ``accum_steps`` from ``rank * accum_steps`` on. The last partial global batch is dropped."""

    def __init__(self, num_samples: int, global_batch: int, seed: int, rank=0, world_size=1, accum_steps=1):
        if global_batch % (world_size * accum_steps):
            raise ValueError(
                f'batch size {global_batch} does not split into {world_size} process(es) x '
                f'{accum_steps} accumulation step(s)'
            )
        if num_samples < global_batch:
            raise ValueError(f'batch size {global_batch} is larger than the dataset ({num_samples} samples)')
        self.num_samples, self.global_batch, self.seed, self.epoch = num_samples, global_batch, seed, 0
        self.rank, self.accum_steps, self.micro = rank, accum_steps, global_batch // (world_size * accum_steps)
        self.steps = num_samples // global_batch  # optimizer steps per epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * self.accum_steps

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g).tolist()
        for step in range(self.steps):
            batch = order[step * self.global_batch : (step + 1) * self.global_batch]
            for k in range(self.accum_steps):
                start = (self.rank * self.accum_steps + k) * self.micro
                yield batch[start : start + self.micro]


@dataclass
class TrainData:
    """What a run trains on: ``train_batches(epoch)`` yields this process's (images, targets) micro-batches of an
    epoch in order, ``steps`` optimizer steps' worth; ``val_batches()`` this process's share of the validation set."""

    train_batches: Callable[[int], Iterable]
    steps: int
    val_batches: Callable[[], Iterable]
    num_classes: int


def image_data(cfg, rank: int, world_size: int, pin_memory: bool) -> TrainData:
    """The images of a `TrainConfig`'s data directory: this process's micro-batches in the seeded order of each epoch,
    each image augmented as seeded for it, and this process's contiguous shard of the validation set."""
    recipe = cfg.recipe
    train_set, val_set, num_classes = build_datasets(cfg.data_dir, cfg.dataset, recipe.aug, recipe.img_size, cfg.model)
    sampler = GlobalBatchSampler(len(train_set), recipe.batch_size, recipe.seed, rank, world_size, cfg.grad_accum_steps)
    seeded_train = SeededDataset(train_set, recipe.seed)
    workers = max(0, min(cfg.workers, os.cpu_count() or 1))
    batches = train_loader(seeded_train, sampler, workers, pin_memory)
    per_rank = (len(val_set) + world_size - 1) // world_size
    val_shard = Subset(val_set, range(rank * per_rank, min(len(val_set), (rank + 1) * per_rank)))
    val_batch = max(recipe.batch_size // world_size, 1)
    val = DataLoader(val_shard, val_batch, num_workers=workers, persistent_workers=workers > 0)

    def train_batches(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        seeded_train.set_epoch(epoch)
        return batches

    return TrainData(train_batches, sampler.steps, lambda: val, num_classes)
