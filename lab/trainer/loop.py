"""The training loop of ``python -m lab.train``: timm's model, optimizer, scheduler, EMA, AMP scaler, metrics and
distributed setup, stepped so that a seeded run is exactly reproducible and resumable (docs/training.md)."""

import contextlib
import csv
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import timm
import torch
import torch.distributed as dist
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import MultiStepLRScheduler, create_scheduler_v2
from timm.utils import AverageMeter, ModelEmaV3, NativeScaler, accuracy, init_distributed_device, reduce_tensor
from tqdm import tqdm

from timm_nam.convert import load_plain_weights
from timm_nam.penalty import NAMSparsityLoss, resolve_penalty

from . import checkpoint as ckpt
from .data import TrainData, image_data
from .recipes import Recipe


@dataclass
class TrainConfig:
    """Everything a run needs: the recipe plus run options (kept as plain data for args.json)."""

    model: str
    data_dir: str
    output: str
    recipe: Recipe
    recipe_name: str
    dataset: str = ''
    num_classes: Optional[int] = None
    model_kwargs: dict = field(default_factory=dict)
    nam_penalty: Any = None  # None: the nam_penalty model kwarg if given, else 'paper' (penalty.resolve_penalty)
    amp: bool = False
    amp_dtype: str = 'bfloat16'
    channels_last: bool = False
    compile: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    grad_accum_steps: int = 1
    workers: int = 2
    resume: Optional[str] = None
    device: str = 'auto'
    limit_train_steps: Optional[int] = None
    drop_path_rate: Optional[float] = None
    initial_checkpoint: Optional[str] = None


class TrainingDivergedError(RuntimeError):
    """The loss or the weights stopped being finite; nothing after the last finished epoch was saved."""


def create_optimizer(model: nn.Module, recipe: Recipe):
    """timm's optimizer for ``recipe`` (norm weights and biases without weight decay unless the recipe says so)."""
    options = ('opt', 'lr', 'weight_decay', 'momentum', 'filter_bias_and_bn')
    return create_optimizer_v2(model, **{name: getattr(recipe, name) for name in options})


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


def _sum_over_processes(values: List[float], device) -> List[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    return reduce_tensor(torch.tensor(values, dtype=torch.float64, device=device), 1).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_ctx, channels_last: bool) -> Dict[str, float]:
    model.eval()
    loss_sum = top1_sum = top5_sum = n = 0.0
    criterion = nn.CrossEntropyLoss(reduction='sum')
    for images, target in loader:
        images = images.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        target = target.to(device)
        with amp_ctx():
            output = model(images)
        output = output.float()
        top1, top5 = accuracy(output, target, topk=(1, min(5, output.shape[1])))
        loss_sum += criterion(output, target).item()
        top1_sum += top1.item() * images.shape[0] / 100
        top5_sum += top5.item() * images.shape[0] / 100
        n += images.shape[0]
    loss_sum, top1_sum, top5_sum, n = _sum_over_processes([loss_sum, top1_sum, top5_sum, n], device)
    return {'loss': loss_sum / n, 'top1': 100 * top1_sum / n, 'top5': 100 * top5_sum / n}


def train(cfg: TrainConfig, data: Optional[TrainData] = None) -> List[dict]:
    """Run (or resume) a run on ``data`` (default: the images of ``cfg.data_dir``); returns the per-epoch metrics."""
    run = Run(cfg, data)
    try:
        for epoch in range(run.start_epoch, run.num_epochs):
            run.epoch(epoch)
    finally:
        if run.world_size > 1:
            dist.destroy_process_group()
    return run.rows


def _check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f'*{name.split("_")[0]}*')[:8]
        raise ValueError(f'Unknown model {name!r}' + (f'; similar: {", ".join(close)}' if close else ''))


def _build_model(cfg: TrainConfig, num_classes: int):
    """The model, seeded, and the kwargs it was built with (saved in every checkpoint so it can be rebuilt).
    ``nam_penalty`` is not one of them: the loss applies p, and the model's optimizer-step hook would apply it again."""
    given = {k: v for k, v in cfg.model_kwargs.items() if k != 'nam_penalty'}
    kwargs = dict(given, num_classes=num_classes)
    if timm.get_pretrained_cfg_value(cfg.model, 'fixed_input_size'):
        kwargs.setdefault('img_size', cfg.recipe.img_size)  # spatial NAM is built for the training size
    if cfg.drop_path_rate is not None:
        kwargs['drop_path_rate'] = cfg.drop_path_rate
    torch.manual_seed(cfg.recipe.seed)
    try:
        return timm.create_model(cfg.model, **kwargs), kwargs
    except TypeError as e:
        if not given:
            raise  # not the user's kwargs: a fault to debug, traceback and all
        raise ValueError(f'{cfg.model} cannot be built with the model kwargs {given}: {e}') from e


class Run:
    """One training run: built (or restored from its last checkpoint) once, then advanced epoch by epoch."""

    def __init__(self, cfg: TrainConfig, data: Optional[TrainData] = None):
        self.cfg, recipe, self.out = cfg, cfg.recipe, Path(cfg.output)
        auto = 'cuda' if torch.cuda.is_available() else 'cpu'
        env = SimpleNamespace(device=auto if cfg.device == 'auto' else cfg.device)
        # timm starts the process group under torchrun (gloo on CPU, nccl on CUDA) and sets env's ranks and world size
        self.device = init_distributed_device(env)
        if self.device.type == 'cuda' and self.device.index is None:  # one process: args.json names the GPU's number
            self.device = torch.device('cuda', torch.cuda.current_device())
        self.rank, self.world_size, self.is_main = env.rank, env.world_size, env.rank == 0
        resume_paths = ckpt.resolve_resume(cfg.resume) if cfg.resume else None
        _check_model_name(cfg.model)
        self.data = data or image_data(cfg, self.rank, self.world_size, pin_memory=self.device.type == 'cuda')
        self.num_classes = cfg.num_classes or self.data.num_classes
        self.model, self.model_kwargs = _build_model(cfg, self.num_classes)  # the model evaluated and saved
        self.penalty_p = resolve_penalty(self.model, cfg.nam_penalty, model_kwarg=cfg.model_kwargs.get('nam_penalty'))
        if resume_paths:
            ckpt.load_weights(self.model, resume_paths[0], cfg.model)
        elif cfg.initial_checkpoint:  # a trained plain network's weights, converted exactly for a NAM model
            load_plain_weights(self.model, ckpt.resolve_checkpoint(cfg.initial_checkpoint))
        self.model.to(self.device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)

        self.optimizer = create_optimizer(self.model, recipe)
        limit = cfg.limit_train_steps
        self.steps_per_epoch = self.data.steps if limit is None else min(self.data.steps, limit)
        self.scheduler, self.num_epochs = create_lr_scheduler(self.optimizer, recipe, self.steps_per_epoch)
        # the EMA copies the bare model, before it is compiled or wrapped for DDP
        self.model_ema = ModelEmaV3(self.model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        self.train_model = torch.compile(self.model) if cfg.compile else self.model
        if self.world_size > 1:
            device_ids = [env.local_rank] if self.device.type == 'cuda' else None
            self.train_model = nn.parallel.DistributedDataParallel(self.train_model, device_ids=device_ids)
        criterion = nn.CrossEntropyLoss(label_smoothing=recipe.smoothing)
        # the penalty is applied here and only here: the nam_penalty model kwarg was kept off the model (_build_model)
        self.loss_fn = NAMSparsityLoss(criterion, self.train_model, self.penalty_p) if self.penalty_p else criterion
        self.amp_ctx, self.loss_scaler = contextlib.nullcontext, None
        if cfg.amp:
            self.amp_ctx = functools.partial(torch.autocast, self.device.type, dtype=getattr(torch, cfg.amp_dtype))
            self.loss_scaler = NativeScaler(self.device.type) if cfg.amp_dtype == 'float16' else None
        self.start_epoch, self.best_top1, self.rows = 0, -1.0, []
        if resume_paths:
            self._restore(*resume_paths)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            run_info = dict(num_classes=self.num_classes, penalty_p=self.penalty_p, world_size=self.world_size)
            versions = dict(device_used=str(self.device), torch=torch.__version__, timm=timm.__version__)
            args = json.dumps(dict(asdict(cfg), **run_info, **versions), indent=1, default=str)
            (self.out / 'args.json').write_text(args)

    def _restore(self, weights: Path, state_path: Path) -> None:
        """Optimizer, scheduler, scaler, EMA, RNGs and metrics of the run being resumed (its weights are loaded)."""
        state = ckpt.load_train_state(state_path)
        weights_epoch = json.loads(ckpt.read_metadata(weights).get('epoch', 'null'))
        if weights_epoch is not None and weights_epoch != int(state['epoch']):
            raise ckpt.DamagedCheckpointError(
                f'{weights} (epoch {weights_epoch + 1}) and {state_path} (epoch {int(state["epoch"]) + 1}) do not '
                'belong together: the run stopped while writing them. Delete both to train that run afresh.'
            )
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.loss_scaler is not None and state.get('scaler'):
            self.loss_scaler.load_state_dict(state['scaler'])
        if self.model_ema is not None:
            ckpt.load_weights(self.model_ema.module, weights.parent / ckpt.WEIGHTS_EMA)
        ckpt.set_rng_state(state['rng'])
        self.start_epoch, self.best_top1 = int(state['epoch']) + 1, float(state['best_top1'])
        if 'metrics' in state:
            self.rows = list(state['metrics'])
        elif (weights.parent / 'metrics.json').is_file():  # checkpoints from before the state held the metrics
            rows = json.loads((weights.parent / 'metrics.json').read_text())
            self.rows = [r for r in rows if r['epoch'] < self.start_epoch]

    def epoch(self, epoch: int) -> None:
        """Train, check, evaluate and (main process) save one epoch."""
        torch.manual_seed(self.cfg.recipe.seed * 1_000_003 + epoch)  # drop-path etc.: independent of resume
        epoch_lr = self.optimizer.param_groups[0]['lr']  # the lr this epoch trains with (set by the last step)
        start = time.perf_counter()
        meters, num_images = self._train_one_epoch(epoch)
        epoch_time = time.perf_counter() - start
        self.scheduler.step(epoch + 1)
        # a finite loss can still end in weights that are not (the last step of an epoch); those are never saved
        if not all(torch.isfinite(t).all() for t in self.model.state_dict().values() if t.is_floating_point()):
            raise self._diverged(f'the weights are not finite after epoch {epoch + 1}')

        val = self._validate(self.model)
        ema_val = self._validate(self.model_ema.module) if self.model_ema is not None else {}
        loss_sum, pen_sum, top1_sum, n = _sum_over_processes([m.sum for m in meters] + [meters[0].count], self.device)
        row = dict(epoch=epoch, lr=epoch_lr, train_loss=loss_sum / n, train_penalty=pen_sum / n)
        row.update(train_top1=top1_sum / n, val_loss=val['loss'], val_top1=val['top1'], val_top5=val['top5'])
        row.update(ema_val_top1=ema_val.get('top1'), ema_val_top5=ema_val.get('top5'))
        row.update(img_per_s=num_images / epoch_time, epoch_time_s=epoch_time)
        self.rows.append(row)
        if self.is_main:
            self._save(epoch, row)
            tqdm.write(
                f'epoch {epoch + 1}/{self.num_epochs}: loss {row["train_loss"]:.4f} (+penalty '
                f'{row["train_penalty"]:.4f}) train top1 {row["train_top1"]:.2f} | val top1 {row["val_top1"]:.2f} '
                f'top5 {row["val_top5"]:.2f} | {row["img_per_s"]:.0f} img/s'
            )
        if self.world_size > 1:
            dist.barrier()

    def _validate(self, model: nn.Module) -> Dict[str, float]:
        return evaluate(model, self.data.val_batches(), self.device, self.amp_ctx, self.cfg.channels_last)

    def _train_one_epoch(self, epoch: int):
        """One epoch of optimizer steps; returns the (loss, penalty, top-1) meters and the number of images seen."""
        self.train_model.train()
        meters = (AverageMeter(), AverageMeter(), AverageMeter())
        num_images, start = 0, time.perf_counter()
        batches = iter(self.data.train_batches(epoch))
        steps, desc = range(self.steps_per_epoch), f'epoch {epoch + 1}/{self.num_epochs}'
        # closed also when a step fails: its error then starts on a line of its own
        with tqdm(steps, desc=desc, disable=not self.is_main, dynamic_ncols=True, leave=False) as bar:
            for step in bar:
                num_images += self._train_step(batches, epoch, step, meters)
                img_s = num_images / (time.perf_counter() - start)
                bar.set_postfix(loss=f'{meters[0].avg:.3f}', acc=f'{meters[2].avg:.1f}', img_s=f'{img_s:.0f}')
        return meters, num_images

    def _train_step(self, batches, epoch: int, step: int, meters) -> int:
        """One optimizer step over ``grad_accum_steps`` micro-batches; returns the number of images (all processes)."""
        loss_m, pen_m, top1_m = meters
        accum, num_images, losses = self.cfg.grad_accum_steps, 0, []
        self.optimizer.zero_grad(set_to_none=True)
        for k in range(accum):
            images, target = next(batches)
            images, target = images.to(self.device, non_blocking=True), target.to(self.device, non_blocking=True)
            if self.cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last = k == accum - 1
            with self.train_model.no_sync() if self.world_size > 1 and not last else contextlib.nullcontext():
                with self.amp_ctx():
                    output = self.train_model(images)
                    loss = self.loss_fn(output, target)
                losses.append(loss.item())
                pen = self.loss_fn.last_penalty.item() if self.penalty_p > 0 else 0.0
                loss_m.update(losses[-1] - pen, images.shape[0])
                pen_m.update(pen, images.shape[0])
                top1_m.update(accuracy(output.detach().float(), target, topk=(1,))[0].item(), images.shape[0])
                # before the step, and every process together (one alone stopping would leave the others waiting)
                if last and _sum_over_processes([float(not all(map(math.isfinite, losses)))], self.device)[0] > 0:
                    raise self._diverged(f'the loss is {losses[-1]} at epoch {epoch + 1}, step {step + 1}')
                if self.loss_scaler is not None:  # float16: backward, and with the last micro-batch the step
                    self.loss_scaler(loss / accum, self.optimizer, need_update=last)
                else:
                    (loss / accum).backward()
            num_images += images.shape[0] * self.world_size
        if self.loss_scaler is None:
            self.optimizer.step()
        global_step = epoch * self.steps_per_epoch + step
        if self.model_ema is not None:
            self.model_ema.update(self.model, step=global_step)
        self.scheduler.step_update(global_step + 1)
        return num_images

    def _diverged(self, what: str) -> TrainingDivergedError:
        return TrainingDivergedError(
            f'{what} (lr {self.optimizer.param_groups[0]["lr"]:g}): training diverged. Try a lower learning rate '
            f'(--lr). Nothing of this epoch was saved; the checkpoints in {self.out} are those of the last finished '
            'epoch.'
        )

    def _save(self, epoch: int, row: dict) -> None:
        """best (if better), EMA and last weights, then the state to resume from (it holds the metrics too), then the
        metrics as JSON and CSV."""
        out, meta = self.out, dict(model_kwargs=self.model_kwargs, epoch=epoch)
        if row['val_top1'] > self.best_top1:
            self.best_top1 = row['val_top1']
            ckpt.save_weights(self.model, out / ckpt.WEIGHTS_BEST, self.cfg.model, **meta, val_top1=row['val_top1'])
        if self.model_ema is not None:
            ckpt.save_weights(self.model_ema.module, out / ckpt.WEIGHTS_EMA, self.cfg.model, **meta)
        ckpt.save_weights(self.model, out / ckpt.WEIGHTS_LAST, self.cfg.model, **meta)
        ckpt.save_train_state(
            out / ckpt.STATE_LAST,
            epoch=epoch,
            best_top1=self.best_top1,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.loss_scaler.state_dict() if self.loss_scaler is not None else {},
            rng=ckpt.rng_state(),
            metrics=self.rows,
        )
        ckpt.atomic_write(out / 'metrics.json', lambda tmp: tmp.write_text(json.dumps(self.rows, indent=1)))
        ckpt.atomic_write(out / 'metrics.csv', functools.partial(_write_csv, rows=self.rows))


def _write_csv(path: Path, rows: List[dict]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
