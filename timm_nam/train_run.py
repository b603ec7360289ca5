"""What timm's ``train.py`` leaves in its output directory, read back: ``args.yaml`` (its arguments), ``summary.csv``
(one row per epoch) and its checkpoints (``model_best.pth.tar``, ``last.pth.tar``, ``checkpoint-N.pth.tar``), and the
trained model rebuilt from them. `timm_nam.hub` exports such a run; ``timm-nam sparsity`` reports on it."""

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import load_state_dict

__all__ = ['TrainRun', 'read_run', 'read_state_dict', 'create_model_from_run']

CHECKPOINTS = ('model_best.pth.tar', 'last.pth.tar')  # what a run directory stands for, in this order


@dataclass
class TrainRun:
    directory: Path
    args: dict  # args.yaml
    summary: List[Dict[str, float]]  # summary.csv, numbers as floats
    checkpoint: Path

    @property
    def model_name(self) -> str:
        """The name the run's model goes by: its model, or for the model ``nam`` (any network with NAM) its base's
        name with ``_nam``, as the registered models are named."""
        name = self.args['model']
        if name != 'nam':
            return name
        from .models.generic import DEFAULT_BASE

        base = (self.args.get('model_kwargs') or {}).get('base', DEFAULT_BASE)
        return f'{base.split(".")[0]}_nam'

    @property
    def input_size(self) -> Optional[Tuple[int, int, int]]:
        """The input size the run trained at, as train.py resolves it (``--input-size``, else ``--img-size``); None
        when neither was given (the model's default)."""
        if self.args.get('input_size'):
            return tuple(self.args['input_size'])
        if self.args.get('img_size'):
            return (3, self.args['img_size'], self.args['img_size'])
        return None


def _numbers(row: Dict[str, str]) -> Dict[str, float]:
    return {k: float(v) for k, v in row.items() if v not in ('', None)}


def read_run(path) -> TrainRun:
    """A train.py output directory, or a checkpoint file in one (the directory stands for its model_best.pth.tar,
    else its last.pth.tar)."""
    import yaml  # timm's dependency

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    missing = [name for name in ('args.yaml', 'summary.csv') if not (directory / name).is_file()]
    if not path.exists() or missing:
        what = f'{path} does not exist' if not path.exists() else f'{", ".join(missing)} missing in {directory}'
        raise FileNotFoundError(f"Not the output directory of timm's train.py: {what}")
    if path.is_dir():
        found = [directory / name for name in CHECKPOINTS if (directory / name).is_file()]
        if not found:
            raise FileNotFoundError(f'No checkpoint in {directory}: expected one of {", ".join(CHECKPOINTS)}')
        path = found[0]
    with open(directory / 'summary.csv', newline='') as f:
        summary = [_numbers(row) for row in csv.DictReader(f)]
    return TrainRun(directory, yaml.safe_load((directory / 'args.yaml').read_text()), summary, path)


def read_state_dict(path, ema: bool = False) -> Dict[str, torch.Tensor]:
    """The weights in a file: timm's ``load_state_dict`` (``.safetensors``, or ``torch.load`` with
    ``weights_only=True``; a checkpoint's ``state_dict``), ``ema``: the EMA weights of a train.py checkpoint. train.py
    saves its arguments beside the weights as an ``argparse.Namespace``, which timm before 1.0.31 does not allow."""
    path = str(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            has_ema = ema and not path.endswith('.safetensors') and 'state_dict_ema' in torch.load(path, mmap=True)
            state = load_state_dict(path, use_ema=ema, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f'No weights file at {path}') from None
    except Exception as e:
        raise ValueError(f'{path} cannot be read as weights: {e}') from None
    if ema and not has_ema:  # timm's loader would quietly give the other weights
        raise ValueError(f'{path} holds no EMA weights (state_dict_ema)')
    return state


def create_model_from_run(run: TrainRun, ema: bool = False) -> nn.Module:
    """The model ``run`` trained, with the weights of its checkpoint (``ema``: the EMA weights), in eval mode."""
    import timm

    name = run.args['model']
    kwargs = {k: v for k, v in (run.args.get('model_kwargs') or {}).items() if k != 'nam_penalty'}
    if run.args.get('num_classes'):
        kwargs['num_classes'] = run.args['num_classes']
    if timm.get_pretrained_cfg_value(name, 'fixed_input_size') and run.input_size:
        kwargs['img_size'] = run.input_size[1:]
    model = timm.create_model(name, **kwargs)
    model.load_state_dict(read_state_dict(run.checkpoint, ema))
    return model.eval()
