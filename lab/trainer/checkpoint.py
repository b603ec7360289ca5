"""Checkpoints of the study trainer (``python -m lab.train``).

Weights go to safetensors (last, best, last_ema) with the model name and kwargs in the metadata, read back with timm's
`load_state_dict`; what an exact resume needs besides (optimizer, scheduler, scaler, epoch, RNG states, metrics) goes
to ``last_state.pt``, plain containers of tensors read with ``torch.load(weights_only=True)``. Every file is written
under a temporary name and renamed, so a run killed mid-write leaves the previous one whole; a file damaged some other
way is a `DamagedCheckpointError` that names it and says what to do.
"""

import contextlib
import json
import os
import pickle
import random
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from timm.models import load_state_dict

WEIGHTS_LAST, WEIGHTS_BEST, WEIGHTS_EMA = 'last.safetensors', 'best.safetensors', 'last_ema.safetensors'
STATE_LAST = 'last_state.pt'


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to this model."""


class DamagedCheckpointError(ValueError):
    """The checkpoint file cannot be read."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A read error inside the block names the file, says what to do, and has no library traceback to read."""
    try:
        yield
    except (SafetensorError, EOFError, pickle.UnpicklingError, RuntimeError) as e:
        advice = 'restore it from a copy'
        if path.name in (WEIGHTS_LAST, STATE_LAST):  # a run's resume point: the run can also start afresh
            advice += f', or delete {WEIGHTS_LAST} and {STATE_LAST} from {path.parent} to train that run afresh'
        raise DamagedCheckpointError(f'{path} is damaged and cannot be read ({e}); {advice}') from None


def resolve_checkpoint(path) -> Path:
    """The checkpoint ``path`` stands for: a file is itself, a run directory its ``last.safetensors``."""
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_LAST
        if not p.is_file():
            raise FileNotFoundError(f'No checkpoint in {path}: expected {p} (a run directory of lab.train)')
    elif not p.is_file():
        raise FileNotFoundError(f'No checkpoint at {p}')
    return p


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename: a run killed mid-write leaves the previous file whole."""
    tmp = path.with_name(path.name + '.tmp')
    write(tmp)
    os.replace(tmp, path)


def save_weights(model: nn.Module, path, model_name: str, model_kwargs: Optional[dict] = None, **extra) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {'model': model_name, 'model_kwargs': json.dumps(model_kwargs or {}), 'format': 'pt'}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    # written by open() rather than safetensors' save_file, which makes every file 0600 whatever the umask
    atomic_write(Path(path), lambda tmp: tmp.write_bytes(save(state, metadata=meta)))


def read_metadata(path: Path) -> Dict[str, str]:
    with _reading(path), safe_open(str(path), framework='pt') as f:
        return dict(f.metadata() or {})


def load_weights(model: nn.Module, path: Path, model_name: Optional[str] = None) -> Dict[str, str]:
    """Load safetensors weights into ``model``; a checkpoint of another architecture is a clear error."""
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint at {path}')
    meta = read_metadata(path)
    if model_name is not None and meta.get('model') not in (None, model_name):
        raise CheckpointMismatchError(f'{path} holds a {meta["model"]!r} model, not {model_name!r}')
    with _reading(path):
        state = load_state_dict(str(path))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch names the missing, unexpected and mis-shaped keys
        raise CheckpointMismatchError(f'{path} does not fit {type(model).__name__}: {e}') from None
    return meta


def rng_state() -> dict:
    """torch's, Python's and numpy's global RNG states as tensors and plain values (readable with weights_only)."""
    version, python, gauss = random.getstate()
    _, numpy, numpy_pos, *_ = np.random.get_state()
    return dict(
        torch=torch.get_rng_state(),
        python=list(python),
        python_version=version,
        python_gauss=gauss,
        numpy=torch.from_numpy(numpy.astype(np.int64)),
        numpy_pos=int(numpy_pos),
    )


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate((state['python_version'], tuple(state['python']), state['python_gauss']))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'], 0, 0.0))


def save_train_state(path, **state) -> None:
    atomic_write(Path(path), lambda tmp: torch.save(state, tmp))


def load_train_state(path: Path) -> dict:
    with _reading(path):
        return torch.load(path, map_location='cpu', weights_only=True)


def resolve_resume(resume) -> Tuple[Path, Path]:
    """A run directory or its last.safetensors -> (weights, state) paths."""
    weights = resolve_checkpoint(resume)
    state = weights.parent / STATE_LAST
    if weights.name != WEIGHTS_LAST or not state.is_file():
        raise FileNotFoundError(
            f'Cannot resume from {resume}: a run resumes from the {WEIGHTS_LAST} and {STATE_LAST} of its directory '
            f'({weights.parent})'
        )
    return weights, state


def create_model_from_checkpoint(path) -> Tuple[nn.Module, Dict[str, str]]:
    """The model a ``python -m lab.train`` checkpoint (a file, or a run directory: its last.safetensors) was saved
    from, with its weights, and the file's metadata (which names the model and its kwargs)."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    if 'model' not in meta:
        raise ValueError(f'{path} does not say which model it holds (not a lab.train checkpoint)')
    model = timm.create_model(meta['model'], **json.loads(meta.get('model_kwargs', '{}')))
    load_weights(model, path)
    return model, meta
