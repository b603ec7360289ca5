""" ``timm-nam train``: timm's data, optimizer, scheduler, EMA and AMP pieces around one exact training loop.

Train any timm-nam model, or any timm model (baselines), with the NAM sparsity penalty as a loss term
(`timm_nam.NAMSparsityLoss`). Runs under ``torchrun`` with DDP (gloo on CPU, nccl on CUDA); ``--batch-size`` is
the global batch of one optimizer step, split over processes and ``--grad-accum-steps``. Every epoch writes
safetensors weights, a resumable training state, and metrics (CSV and JSON); resuming from an epoch checkpoint
reproduces an uninterrupted run exactly (seeded data order and per-sample augmentation, restored optimizer,
scheduler, scaler and RNG states).
"""
import contextlib
import csv
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy
from torch.utils.data import DataLoader, Subset
try:  # progress bars come with the 'train' extra; without it, one line per epoch
    from tqdm import tqdm
except ImportError:
    tqdm = None

from ..penalty import NAMSparsityLoss, nam_scales, paper_penalty
from .checkpoint import (
    STATE_LAST, WEIGHTS_BEST, WEIGHTS_EMA, WEIGHTS_LAST, CheckpointMismatchError, load_train_state, load_weights,
    read_metadata, resolve_resume, rng_state, save_train_state, save_weights, set_rng_state)
from .data import GlobalBatchSampler, SeededDataset, build_datasets, shard_indices, train_loader, worker_count
from .recipes import Recipe

__all__ = ['TrainConfig', 'train']

METRIC_FIELDS = ('epoch', 'lr', 'train_loss', 'train_penalty', 'train_top1', 'val_loss', 'val_top1', 'val_top5',
                 'ema_val_top1', 'ema_val_top5', 'img_per_s', 'epoch_time_s')


class TrainConfig:
    """Everything a run needs: the recipe plus run options (kept as plain data for args.json)."""

    def __init__(self, model: str, data_dir: str, output: str, recipe: Recipe, recipe_name: str,
                 dataset: str = '', num_classes: Optional[int] = None, model_kwargs: Optional[dict] = None,
                 nam_penalty='paper', amp: bool = False, amp_dtype: str = 'bfloat16', channels_last: bool = False,
                 compile: bool = False, model_ema: bool = False, model_ema_decay: float = 0.9998,
                 grad_accum_steps: int = 1, workers: int = 2, resume: Optional[str] = None, device: str = 'auto',
                 limit_train_steps: Optional[int] = None, drop_path_rate: Optional[float] = None):
        self.__dict__.update({k: v for k, v in locals().items() if k != 'self'})
        self.model_kwargs = dict(model_kwargs or {})

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d['recipe'] = asdict(self.recipe)
        return d


def _dist_env():
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    return rank, local_rank, world_size


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name == 'cuda':
        torch.cuda.set_device(local_rank)
        return torch.device('cuda', local_rank)
    return torch.device(name)


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        raise ValueError(f'Unknown model {name!r}' + (f'; similar: {", ".join(close)}' if close else ''))


def _model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """The kwargs the model is built with; saved in every checkpoint so it can be rebuilt."""
    kwargs = dict(cfg.model_kwargs, num_classes=num_classes)
    if timm.get_pretrained_cfg_value(cfg.model, 'fixed_input_size'):
        kwargs.setdefault('img_size', cfg.recipe.img_size)  # spatial NAM is built for the training size
    if cfg.drop_path_rate is not None:
        kwargs['drop_path_rate'] = cfg.drop_path_rate
    return kwargs


def _resolve_penalty(model: nn.Module, requested) -> float:
    if not nam_scales(model):
        return 0.0
    if requested in (None, 'paper'):
        return paper_penalty(model)
    return float(requested)


class _Meter:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, value: float, n: int = 1):
        self.total += value * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.total / max(self.count, 1)


def _all_reduce_sum(values: List[float], device) -> List[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_ctx, channels_last: bool) -> Dict[str, float]:
    model.eval()
    loss_sum = top1_sum = top5_sum = n = 0.0
    criterion = nn.CrossEntropyLoss(reduction='sum')
    for images, target in loader:
        images, target = images.to(device), target.to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            output = model(images)
        output = output.float()
        top1, top5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        loss_sum += criterion(output, target).item()
        top1_sum += top1.item() * images.shape[0] / 100
        top5_sum += top5.item() * images.shape[0] / 100
        n += images.shape[0]
    loss_sum, top1_sum, top5_sum, n = _all_reduce_sum([loss_sum, top1_sum, top5_sum, n], device)
    return {'loss': loss_sum / n, 'top1': 100 * top1_sum / n, 'top5': 100 * top5_sum / n}


def _write_metrics(out: Path, rows: List[dict]) -> None:
    with open(out / 'metrics.json.tmp', 'w') as f:
        json.dump(rows, f, indent=1)
    os.replace(out / 'metrics.json.tmp', out / 'metrics.json')
    with open(out / 'metrics.csv.tmp', 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    os.replace(out / 'metrics.csv.tmp', out / 'metrics.csv')


def create_lr_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    """timm's scheduler for ``recipe``; the loop calls ``step_update`` after every optimizer step and ``step`` after
    every epoch, and the scheduler acts on whichever ``recipe.sched_on_updates`` selects."""
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched=recipe.sched, num_epochs=recipe.epochs, decay_milestones=list(recipe.decay_milestones),
        decay_rate=recipe.decay_rate, warmup_epochs=recipe.warmup_epochs, updates_per_epoch=steps_per_epoch,
        step_on_epochs=not recipe.sched_on_updates)
    if isinstance(scheduler, MultiStepLRScheduler):
        # timm applies milestone m from schedule index m - 1 (its documented convention), one epoch (or update)
        # before PyTorch's MultiStepLR, which the authors' script steps after every epoch. Shifted, epoch m is the
        # first to train at the decayed lr, so the cifar recipe's 60/120/160 give their 60/60/40/40 epochs.
        scheduler.decay_t = sorted(t + 1 for t in scheduler.decay_t)  # timm bisects; PyTorch takes any order
    return scheduler, num_epochs


def train(cfg: TrainConfig) -> List[dict]:
    """Run (or resume) a training run; returns the per-epoch metrics."""
    rank, local_rank, world_size = _dist_env()
    distributed = world_size > 1
    device = _resolve_device(cfg.device, local_rank)
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    is_main = rank == 0
    recipe = cfg.recipe
    out = Path(cfg.output)
    resume_paths = resolve_resume(cfg.resume) if cfg.resume else None

    _check_model_name(cfg.model)
    train_set, val_set, found_classes = build_datasets(
        cfg.data_dir, cfg.dataset, recipe.aug, recipe.img_size, cfg.model)
    num_classes = cfg.num_classes or found_classes
    torch.manual_seed(recipe.seed)
    model_kwargs = _model_kwargs(cfg, num_classes)
    model = timm.create_model(cfg.model, **model_kwargs)
    if resume_paths:
        meta = read_metadata(resume_paths[0])
        if meta.get('model') != cfg.model:
            raise CheckpointMismatchError(f'{resume_paths[0]} holds a {meta.get("model")!r} model, not {cfg.model!r}')
        load_weights(model, resume_paths[0], cfg.model)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    penalty_p = _resolve_penalty(model, cfg.nam_penalty)
    optimizer = create_optimizer_v2(
        model, opt=recipe.opt, lr=recipe.lr, weight_decay=recipe.weight_decay, momentum=recipe.momentum,
        filter_bias_and_bn=recipe.filter_bias_and_bn)
    sampler = GlobalBatchSampler(len(train_set), recipe.batch_size, recipe.seed, rank, world_size,
                                 cfg.grad_accum_steps)
    steps_per_epoch = sampler.steps if cfg.limit_train_steps is None else min(sampler.steps, cfg.limit_train_steps)
    scheduler, num_epochs = create_lr_scheduler(optimizer, recipe, steps_per_epoch)
    model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None

    use_amp = cfg.amp
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}[cfg.amp_dtype]
    scaler = torch.amp.GradScaler(device.type) if use_amp and amp_dtype == torch.float16 else None

    def amp_ctx():
        return torch.autocast(device.type, dtype=amp_dtype) if use_amp else contextlib.nullcontext()

    train_model = model
    if cfg.compile:
        train_model = torch.compile(train_model)
    if distributed:
        train_model = nn.parallel.DistributedDataParallel(train_model, device_ids=[local_rank] if device.type == 'cuda' else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.smoothing)
    loss_fn = NAMSparsityLoss(criterion, train_model, penalty_p) if penalty_p > 0 else criterion

    start_epoch, rows, best_top1 = 0, [], -1.0
    if resume_paths:
        state = load_train_state(resume_paths[1])
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        if model_ema is not None:
            load_weights(model_ema.module, out / WEIGHTS_EMA if (out / WEIGHTS_EMA).is_file()
                         else resume_paths[0].parent / WEIGHTS_EMA)
        set_rng_state(state['rng'])
        start_epoch, best_top1 = int(state['epoch']) + 1, float(state['best_top1'])
        metrics_file = resume_paths[0].parent / 'metrics.json'
        if metrics_file.is_file():
            rows = [r for r in json.loads(metrics_file.read_text()) if r['epoch'] < start_epoch]

    seeded_train = SeededDataset(train_set, recipe.seed)
    workers = worker_count(cfg.workers)
    train_batches = train_loader(seeded_train, sampler, workers, pin_memory=device.type == 'cuda')
    val_shard = Subset(val_set, shard_indices(len(val_set), rank, world_size))
    val_loader = DataLoader(val_shard, batch_size=max(recipe.batch_size // world_size, 1), num_workers=workers,
                            persistent_workers=workers > 0)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'args.json').write_text(json.dumps(dict(cfg.to_dict(), num_classes=num_classes, penalty_p=penalty_p,
                                                       world_size=world_size, device_used=str(device), torch=torch.__version__,
                                                       timm=timm.__version__), indent=1, default=str))

    accum = cfg.grad_accum_steps
    for epoch in range(start_epoch, num_epochs):
        torch.manual_seed(recipe.seed * 1_000_003 + epoch)  # drop-path etc.: independent of resume
        sampler.set_epoch(epoch)
        seeded_train.set_epoch(epoch)
        train_model.train()
        epoch_lr = optimizer.param_groups[0]['lr']  # the lr this epoch trains with (set by the last scheduler step)
        loss_m, pen_m, top1_m = _Meter(), _Meter(), _Meter()
        start = time.perf_counter()
        num_images = 0
        batches = iter(train_batches)
        bar = range(steps_per_epoch) if tqdm is None else tqdm(
            range(steps_per_epoch), desc=f'epoch {epoch + 1}/{num_epochs}', disable=not is_main, dynamic_ncols=True,
            leave=False)
        for step in bar:
            optimizer.zero_grad(set_to_none=True)
            for k in range(accum):
                images, target = next(batches)
                images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                sync = contextlib.nullcontext() if (not distributed or k == accum - 1) else train_model.no_sync()
                with sync:
                    with amp_ctx():
                        output = train_model(images)
                        loss = loss_fn(output, target)
                    scaled = loss / accum
                    (scaler.scale(scaled) if scaler is not None else scaled).backward()
                pen = loss_fn.last_penalty.item() if penalty_p > 0 else 0.0
                loss_m.update(loss.item() - pen, images.shape[0])
                pen_m.update(pen, images.shape[0])
                top1_m.update(accuracy(output.detach().float(), target, topk=(1,))[0].item(), images.shape[0])
                num_images += images.shape[0] * world_size
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if model_ema is not None:
                model_ema.update(model, step=epoch * steps_per_epoch + step)
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            if tqdm is not None:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f'{loss_m.avg:.3f}', acc=f'{top1_m.avg:.1f}', img_s=f'{num_images / elapsed:.0f}')
        if tqdm is not None:
            bar.close()
        epoch_time = time.perf_counter() - start
        scheduler.step(epoch + 1)

        val = evaluate(model, val_loader, device, amp_ctx, cfg.channels_last)
        ema_val = evaluate(model_ema.module, val_loader, device, amp_ctx, cfg.channels_last) if model_ema else None
        train_stats = _all_reduce_sum([loss_m.total, pen_m.total, top1_m.total, loss_m.count], device)
        row = {
            'epoch': epoch, 'lr': epoch_lr,
            'train_loss': train_stats[0] / train_stats[3], 'train_penalty': train_stats[1] / train_stats[3],
            'train_top1': train_stats[2] / train_stats[3],
            'val_loss': val['loss'], 'val_top1': val['top1'], 'val_top5': val['top5'],
            'ema_val_top1': ema_val['top1'] if ema_val else None, 'ema_val_top5': ema_val['top5'] if ema_val else None,
            'img_per_s': num_images / epoch_time, 'epoch_time_s': epoch_time,
        }
        rows.append(row)
        if is_main:
            meta = dict(model_kwargs=model_kwargs)
            if val['top1'] > best_top1:
                best_top1 = val['top1']
                save_weights(model, out / WEIGHTS_BEST, cfg.model, **meta, epoch=epoch, val_top1=val['top1'])
            if model_ema is not None:
                save_weights(model_ema.module, out / WEIGHTS_EMA, cfg.model, **meta, epoch=epoch)
            save_weights(model, out / WEIGHTS_LAST, cfg.model, **meta, epoch=epoch)
            save_train_state(
                out / STATE_LAST, epoch=epoch, best_top1=best_top1, optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler is not None else {},
                rng=rng_state())
            _write_metrics(out, rows)
            (print if tqdm is None else tqdm.write)(f'epoch {epoch + 1}/{num_epochs}: loss {row["train_loss"]:.4f} (+penalty '
                       f'{row["train_penalty"]:.4f}) train top1 {row["train_top1"]:.2f} | val top1 {val["top1"]:.2f} '
                       f'top5 {val["top5"]:.2f} | {row["img_per_s"]:.0f} img/s')
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()
    return rows
