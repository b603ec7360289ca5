"""``python -m lab.train``: timm's data, optimizer, scheduler, EMA and AMP pieces around one exact training loop.

Train any timm-nam model, or any timm model (baselines), with the NAM sparsity penalty as a loss term
(`timm_nam.NAMSparsityLoss`). Runs under ``torchrun`` with DDP (gloo on CPU, nccl on CUDA); ``--batch-size`` is
the global batch of one optimizer step, split over processes and ``--grad-accum-steps``. Every epoch writes
safetensors weights, a resumable training state, and metrics (CSV and JSON); resuming from an epoch checkpoint
reproduces an uninterrupted run exactly (seeded data order and per-sample augmentation, restored optimizer,
scheduler, scaler and RNG states). A loss or weights that stop being finite end the run (`TrainingDivergedError`)
before anything is saved, so the checkpoints stay those of the last finished epoch.
"""

import contextlib
import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

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

from timm_nam.convert import load_plain_weights
from timm_nam.penalty import NAMSparsityLoss, resolve_penalty

from .checkpoint import (
    STATE_LAST,
    WEIGHTS_BEST,
    WEIGHTS_EMA,
    WEIGHTS_LAST,
    DamagedCheckpointError,
    load_train_state,
    load_weights,
    read_metadata,
    resolve_checkpoint,
    resolve_resume,
    rng_state,
    save_train_state,
    save_weights,
    set_rng_state,
)
from .data import GlobalBatchSampler, SeededDataset, build_datasets, shard_indices, train_loader, worker_count
from .recipes import Recipe

__all__ = ['TrainConfig', 'TrainingDivergedError', 'train']

METRIC_FIELDS = (
    'epoch',
    'lr',
    'train_loss',
    'train_penalty',
    'train_top1',
    'val_loss',
    'val_top1',
    'val_top5',
    'ema_val_top1',
    'ema_val_top5',
    'img_per_s',
    'epoch_time_s',
)


class TrainConfig:
    """Everything a run needs: the recipe plus run options (kept as plain data for args.json)."""

    def __init__(
        self,
        model: str,
        data_dir: str,
        output: str,
        recipe: Recipe,
        recipe_name: str,
        dataset: str = '',
        num_classes: Optional[int] = None,
        model_kwargs: Optional[dict] = None,
        nam_penalty=None,  # None: the nam_penalty model kwarg if given, else 'paper' (penalty.resolve_penalty)
        amp: bool = False,
        amp_dtype: str = 'bfloat16',
        channels_last: bool = False,
        compile: bool = False,
        model_ema: bool = False,
        model_ema_decay: float = 0.9998,
        grad_accum_steps: int = 1,
        workers: int = 2,
        resume: Optional[str] = None,
        device: str = 'auto',
        limit_train_steps: Optional[int] = None,
        drop_path_rate: Optional[float] = None,
        initial_checkpoint: Optional[str] = None,
    ):
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


class TrainingDivergedError(RuntimeError):
    """The loss or the weights stopped being finite; nothing after the last finished epoch was saved."""


def _model_kwargs(cfg: TrainConfig, num_classes: int) -> dict:
    """The kwargs the model is built with. ``nam_penalty`` is not one of them: the loss applies p, so the model's
    optimizer-step hook would apply it a second time."""
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != 'nam_penalty'}
    kwargs['num_classes'] = num_classes
    if timm.get_pretrained_cfg_value(cfg.model, 'fixed_input_size'):
        kwargs.setdefault('img_size', cfg.recipe.img_size)  # spatial NAM is built for the training size
    if cfg.drop_path_rate is not None:
        kwargs['drop_path_rate'] = cfg.drop_path_rate
    return kwargs


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


def _any_process(flag: bool, device) -> bool:
    return _all_reduce_sum([float(flag)], device)[0] > 0


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


def create_optimizer(model: nn.Module, recipe: Recipe):
    """timm's optimizer for ``recipe`` (norm weights and biases without weight decay unless the recipe says so)."""
    return create_optimizer_v2(
        model,
        opt=recipe.opt,
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        momentum=recipe.momentum,
        filter_bias_and_bn=recipe.filter_bias_and_bn,
    )


def create_lr_scheduler(optimizer, recipe: Recipe, steps_per_epoch: int):
    """timm's scheduler for ``recipe``; the loop calls ``step_update`` after every optimizer step and ``step`` after
    every epoch, and the scheduler acts on whichever ``recipe.sched_on_updates`` selects."""
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched=recipe.sched,
        num_epochs=recipe.epochs,
        decay_milestones=list(recipe.decay_milestones),
        decay_rate=recipe.decay_rate,
        warmup_epochs=recipe.warmup_epochs,
        updates_per_epoch=steps_per_epoch,
        step_on_epochs=not recipe.sched_on_updates,
    )
    if isinstance(scheduler, MultiStepLRScheduler):
        # timm applies milestone m from schedule index m - 1 (its documented convention), one epoch (or update)
        # before PyTorch's MultiStepLR, which the authors' script steps after every epoch. Shifted, epoch m is the
        # first to train at the decayed lr, so the cifar recipe's 60/120/160 give their 60/60/40/40 epochs.
        scheduler.decay_t = sorted(t + 1 for t in scheduler.decay_t)  # timm bisects; PyTorch takes any order
    return scheduler, num_epochs


def train(cfg: TrainConfig) -> List[dict]:
    """Run (or resume) a training run; returns the per-epoch metrics."""
    run = _setup(cfg)
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            _run_epoch(run, epoch)
    finally:
        if run.distributed:
            dist.destroy_process_group()
    return run.rows


AMP_DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16}


@dataclass
class _Run:
    """What a run trains with, built once by `_setup`; the per-epoch functions read and advance it."""

    cfg: TrainConfig
    rank: int
    world_size: int
    device: torch.device
    out: Path
    model: nn.Module  # the model itself: evaluated and saved
    train_model: nn.Module  # the model as trained: compiled and/or wrapped by DDP
    model_kwargs: dict
    num_classes: int
    penalty_p: float
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    steps_per_epoch: int
    scaler: Optional[torch.amp.GradScaler]
    model_ema: Optional[ModelEmaV3]
    sampler: GlobalBatchSampler
    seeded_train: SeededDataset
    train_batches: DataLoader
    val_loader: DataLoader
    start_epoch: int = 0
    best_top1: float = -1.0
    rows: List[dict] = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def amp_ctx(self):
        if not self.cfg.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.cfg.amp_dtype])


def _setup(cfg: TrainConfig) -> _Run:
    rank, local_rank, world_size = _dist_env()
    device = _resolve_device(cfg.device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend='nccl' if device.type == 'cuda' else 'gloo')
    recipe = cfg.recipe
    resume_paths = resolve_resume(cfg.resume) if cfg.resume else None

    _check_model_name(cfg.model)
    train_set, val_set, found_classes = build_datasets(
        cfg.data_dir, cfg.dataset, recipe.aug, recipe.img_size, cfg.model
    )
    num_classes = cfg.num_classes or found_classes
    model, model_kwargs = _build_model(cfg, num_classes)
    penalty_p = resolve_penalty(model, cfg.nam_penalty, model_kwarg=cfg.model_kwargs.get('nam_penalty'))
    if resume_paths:
        load_weights(model, resume_paths[0], cfg.model)
    elif cfg.initial_checkpoint:  # a trained plain network's weights, converted exactly for a NAM model
        load_plain_weights(model, resolve_checkpoint(cfg.initial_checkpoint))
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = create_optimizer(model, recipe)
    sampler = GlobalBatchSampler(len(train_set), recipe.batch_size, recipe.seed, rank, world_size, cfg.grad_accum_steps)
    steps_per_epoch = sampler.steps if cfg.limit_train_steps is None else min(sampler.steps, cfg.limit_train_steps)
    scheduler, num_epochs = create_lr_scheduler(optimizer, recipe, steps_per_epoch)
    model_ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None  # a copy of the bare model
    train_model = _wrap_for_training(model, cfg, device, local_rank, world_size)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.smoothing)
    seeded_train = SeededDataset(train_set, recipe.seed)
    workers = worker_count(cfg.workers)
    run = _Run(
        cfg=cfg,
        rank=rank,
        world_size=world_size,
        device=device,
        out=Path(cfg.output),
        model=model,
        train_model=train_model,
        model_kwargs=model_kwargs,
        num_classes=num_classes,
        penalty_p=penalty_p,
        # the penalty is applied here and only here: the nam_penalty model kwarg was kept off the model (_build_model)
        loss_fn=NAMSparsityLoss(criterion, train_model, penalty_p) if penalty_p > 0 else criterion,
        optimizer=optimizer,
        scheduler=scheduler,
        num_epochs=num_epochs,
        steps_per_epoch=steps_per_epoch,
        scaler=torch.amp.GradScaler(device.type) if cfg.amp and cfg.amp_dtype == 'float16' else None,
        model_ema=model_ema,
        sampler=sampler,
        seeded_train=seeded_train,
        train_batches=train_loader(seeded_train, sampler, workers, pin_memory=device.type == 'cuda'),
        val_loader=_val_loader(val_set, recipe.batch_size, workers, rank, world_size),
    )
    if resume_paths:
        _restore(run, *resume_paths)
    if run.is_main:
        _write_args(run)
    return run


def _val_loader(val_set, global_batch: int, workers: int, rank: int, world_size: int) -> DataLoader:
    """This process's shard of the validation set."""
    return DataLoader(
        Subset(val_set, shard_indices(len(val_set), rank, world_size)),
        batch_size=max(global_batch // world_size, 1),
        num_workers=workers,
        persistent_workers=workers > 0,
    )


def _build_model(cfg: TrainConfig, num_classes: int):
    """The model, seeded, and the kwargs it was built with (saved in every checkpoint so it can be rebuilt)."""
    kwargs = _model_kwargs(cfg, num_classes)
    torch.manual_seed(cfg.recipe.seed)
    try:
        return timm.create_model(cfg.model, **kwargs), kwargs
    except TypeError as e:
        given = {k: v for k, v in cfg.model_kwargs.items() if k != 'nam_penalty'}
        if not given:
            raise  # not the user's kwargs: a fault to debug, traceback and all
        raise ValueError(f'{cfg.model} cannot be built with the model kwargs {given}: {e}') from e


def _wrap_for_training(model: nn.Module, cfg: TrainConfig, device, local_rank: int, world_size: int) -> nn.Module:
    if cfg.compile:
        model = torch.compile(model)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == 'cuda' else None)
    return model


def _restore(run: _Run, weights: Path, state_path: Path) -> None:
    """Optimizer, scheduler, scaler, EMA, RNGs and metrics of the run being resumed (its weights are loaded)."""
    state = load_train_state(state_path)
    weights_epoch = json.loads(read_metadata(weights).get('epoch', 'null'))
    if weights_epoch is not None and weights_epoch != int(state['epoch']):
        raise DamagedCheckpointError(
            f'{weights} (epoch {weights_epoch + 1}) and {state_path} (epoch {int(state["epoch"]) + 1}) do not belong '
            'together: the run stopped while writing them. Delete both to train that run afresh.'
        )
    run.optimizer.load_state_dict(state['optimizer'])
    run.scheduler.load_state_dict(state['scheduler'])
    if run.scaler is not None and state.get('scaler'):
        run.scaler.load_state_dict(state['scaler'])
    if run.model_ema is not None:
        ema = run.out / WEIGHTS_EMA if (run.out / WEIGHTS_EMA).is_file() else weights.parent / WEIGHTS_EMA
        load_weights(run.model_ema.module, ema)
    set_rng_state(state['rng'])
    run.start_epoch, run.best_top1 = int(state['epoch']) + 1, float(state['best_top1'])
    if 'metrics' in state:
        run.rows = list(state['metrics'])
    elif (weights.parent / 'metrics.json').is_file():  # checkpoints from before the state held the metrics
        rows = json.loads((weights.parent / 'metrics.json').read_text())
        run.rows = [r for r in rows if r['epoch'] < run.start_epoch]


def _write_args(run: _Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    args = dict(
        run.cfg.to_dict(),
        num_classes=run.num_classes,
        penalty_p=run.penalty_p,
        world_size=run.world_size,
        device_used=str(run.device),
        torch=torch.__version__,
        timm=timm.__version__,
    )
    (run.out / 'args.json').write_text(json.dumps(args, indent=1, default=str))


def _run_epoch(run: _Run, epoch: int) -> None:
    torch.manual_seed(run.cfg.recipe.seed * 1_000_003 + epoch)  # drop-path etc.: independent of resume
    run.sampler.set_epoch(epoch)
    run.seeded_train.set_epoch(epoch)
    epoch_lr = run.optimizer.param_groups[0]['lr']  # the lr this epoch trains with (set by the last scheduler step)
    start = time.perf_counter()
    meters, num_images = _train_one_epoch(run, epoch)
    epoch_time = time.perf_counter() - start
    run.scheduler.step(epoch + 1)
    _check_finite_weights(run, epoch)

    val = evaluate(run.model, run.val_loader, run.device, run.amp_ctx, run.cfg.channels_last)
    ema_val = None
    if run.model_ema is not None:
        ema_val = evaluate(run.model_ema.module, run.val_loader, run.device, run.amp_ctx, run.cfg.channels_last)
    loss_sum, pen_sum, top1_sum, n = _all_reduce_sum([m.total for m in meters] + [meters[0].count], run.device)
    row = {
        'epoch': epoch,
        'lr': epoch_lr,
        'train_loss': loss_sum / n,
        'train_penalty': pen_sum / n,
        'train_top1': top1_sum / n,
        'val_loss': val['loss'],
        'val_top1': val['top1'],
        'val_top5': val['top5'],
        'ema_val_top1': ema_val['top1'] if ema_val else None,
        'ema_val_top5': ema_val['top5'] if ema_val else None,
        'img_per_s': num_images / epoch_time,
        'epoch_time_s': epoch_time,
    }
    run.rows.append(row)
    if run.is_main:
        _save_epoch(run, epoch, row)
        _log(
            f'epoch {epoch + 1}/{run.num_epochs}: loss {row["train_loss"]:.4f} (+penalty {row["train_penalty"]:.4f}) '
            f'train top1 {row["train_top1"]:.2f} | val top1 {row["val_top1"]:.2f} top5 {row["val_top5"]:.2f} | '
            f'{row["img_per_s"]:.0f} img/s'
        )
    if run.distributed:
        dist.barrier()


def _train_one_epoch(run: _Run, epoch: int):
    """One epoch of optimizer steps; returns the (loss, penalty, top-1) meters and the number of images seen."""
    run.train_model.train()
    meters = (_Meter(), _Meter(), _Meter())
    num_images = 0
    start = time.perf_counter()
    batches = iter(run.train_batches)
    bar = _progress(run, epoch)
    try:
        for step in bar:
            num_images += _train_step(run, batches, epoch, step, meters)
            if tqdm is not None:
                img_s = num_images / (time.perf_counter() - start)
                bar.set_postfix(loss=f'{meters[0].avg:.3f}', acc=f'{meters[2].avg:.1f}', img_s=f'{img_s:.0f}')
    finally:  # also when a step fails: its error then starts on a line of its own
        if tqdm is not None:
            bar.close()
    return meters, num_images


def _progress(run: _Run, epoch: int):
    steps = range(run.steps_per_epoch)
    if tqdm is None:
        return steps
    desc = f'epoch {epoch + 1}/{run.num_epochs}'
    return tqdm(steps, desc=desc, disable=not run.is_main, dynamic_ncols=True, leave=False)


def _train_step(run: _Run, batches, epoch: int, step: int, meters) -> int:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the number of images (all processes)."""
    loss_m, pen_m, top1_m = meters
    accum, num_images, losses = run.cfg.grad_accum_steps, 0, []
    run.optimizer.zero_grad(set_to_none=True)
    for k in range(accum):
        images, target = next(batches)
        images, target = images.to(run.device, non_blocking=True), target.to(run.device, non_blocking=True)
        if run.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        last = k == accum - 1
        sync = contextlib.nullcontext() if (not run.distributed or last) else run.train_model.no_sync()
        with sync:
            with run.amp_ctx():
                output = run.train_model(images)
                loss = run.loss_fn(output, target)
            scaled = loss / accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        losses.append(loss.item())
        pen = run.loss_fn.last_penalty.item() if run.penalty_p > 0 else 0.0
        loss_m.update(losses[-1] - pen, images.shape[0])
        pen_m.update(pen, images.shape[0])
        top1_m.update(accuracy(output.detach().float(), target, topk=(1,))[0].item(), images.shape[0])
        num_images += images.shape[0] * run.world_size
    # every process decides together (one of them alone stopping would leave the others waiting in DDP)
    if _any_process(not all(math.isfinite(v) for v in losses), run.device):
        raise TrainingDivergedError(
            f'the loss is {losses[-1]} at epoch {epoch + 1}, step {step + 1} (lr '
            f'{run.optimizer.param_groups[0]["lr"]:g}): training diverged. Try a lower learning rate (--lr). '
            f'Nothing of this epoch was saved; the checkpoints in {run.out} are those of the last finished epoch.'
        )
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    global_step = epoch * run.steps_per_epoch + step
    if run.model_ema is not None:
        run.model_ema.update(run.model, step=global_step)
    run.scheduler.step_update(global_step + 1)
    return num_images


def _check_finite_weights(run: _Run, epoch: int) -> None:
    """A finite loss can still end in weights that are not (the last step of an epoch); those are never saved."""
    if all(torch.isfinite(t).all() for t in run.model.state_dict().values() if t.is_floating_point()):
        return
    raise TrainingDivergedError(
        f'the weights are not finite after epoch {epoch + 1} (lr {run.optimizer.param_groups[0]["lr"]:g}): training '
        f'diverged. Try a lower learning rate (--lr). The checkpoints in {run.out} are those of the last finished '
        'epoch.'
    )


def _save_epoch(run: _Run, epoch: int, row: dict) -> None:
    """best (if better), EMA and last weights, then the state to resume from (it holds the metrics too), then the
    metrics files."""
    out, meta = run.out, dict(model_kwargs=run.model_kwargs)
    if row['val_top1'] > run.best_top1:
        run.best_top1 = row['val_top1']
        save_weights(run.model, out / WEIGHTS_BEST, run.cfg.model, **meta, epoch=epoch, val_top1=row['val_top1'])
    if run.model_ema is not None:
        save_weights(run.model_ema.module, out / WEIGHTS_EMA, run.cfg.model, **meta, epoch=epoch)
    save_weights(run.model, out / WEIGHTS_LAST, run.cfg.model, **meta, epoch=epoch)
    save_train_state(
        out / STATE_LAST,
        epoch=epoch,
        best_top1=run.best_top1,
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else {},
        rng=rng_state(),
        metrics=run.rows,
    )
    _write_metrics(out, run.rows)


def _log(text: str) -> None:
    (print if tqdm is None else tqdm.write)(text)
