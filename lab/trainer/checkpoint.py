"""Checkpoints of the study trainer (``python -m lab.train``).

Weights go to safetensors (``last.safetensors``, ``best.safetensors``, ``last_ema.safetensors``) with the
model name and kwargs in the file's metadata. Everything needed to resume exactly (optimizer, scheduler,
grad scaler, epoch, RNG states) goes to ``last_state.pt``, which holds only tensors and plain containers and
is read with ``torch.load(weights_only=True)``. Files are written to a temporary name and renamed, so a run
killed mid-write leaves the previous checkpoint intact; a file damaged some other way (a full disk, a cut-off copy)
is a `DamagedCheckpointError` that names it. A run directory or a file in it stands for its checkpoint wherever
one is read (`resolve_checkpoint`).
"""

import contextlib
import json
import os
import pickle
import random
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = [
    'resolve_checkpoint',
    'save_weights',
    'load_weights',
    'read_metadata',
    'save_train_state',
    'load_train_state',
    'rng_state',
    'set_rng_state',
    'CheckpointMismatchError',
    'DamagedCheckpointError',
]

WEIGHTS_LAST, WEIGHTS_BEST, WEIGHTS_EMA, STATE_LAST = (
    'last.safetensors',
    'best.safetensors',
    'last_ema.safetensors',
    'last_state.pt',
)


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to this model."""


class DamagedCheckpointError(ValueError):
    """The checkpoint file cannot be read."""


@contextlib.contextmanager
def _reading(path: Path, what_to_do: str) -> Iterator[None]:
    """A read error inside the block names the file, says what to do, and has no library traceback to read."""
    try:
        yield
    except (SafetensorError, EOFError, pickle.UnpicklingError, RuntimeError) as e:
        raise DamagedCheckpointError(f'{path} is damaged and cannot be read ({e}); {what_to_do}') from None


def _damaged_advice(path: Path) -> str:
    if path.name == WEIGHTS_LAST:
        return (
            f'restore it from a copy, or delete {path.name} and {STATE_LAST} from {path.parent} to train that run '
            f"afresh ({WEIGHTS_BEST} holds the best epoch's weights for export and evaluation)"
        )
    return 'restore it from a copy'


def resolve_checkpoint(path, name: str = WEIGHTS_LAST) -> Path:
    """The checkpoint ``path`` stands for: a file is itself, a run directory its ``name`` (``last.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        p = p / name
        if not p.is_file():
            raise FileNotFoundError(f'No checkpoint in {path}: expected {p} (a run directory of lab.train)')
    elif not p.is_file():
        raise FileNotFoundError(f'No checkpoint at {p}')
    return p


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + '.tmp')
    write(tmp)
    os.replace(tmp, path)


def _new_file_mode() -> int:
    """The permissions ``open()`` gives a new file under the current umask (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_weights(model: nn.Module, path, model_name: str, model_kwargs: Optional[dict] = None, **extra) -> None:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {'model': model_name, 'model_kwargs': json.dumps(model_kwargs or {}), 'format': 'pt'}
    meta.update({k: json.dumps(v) for k, v in extra.items()})

    def write(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=meta)
        os.chmod(tmp, _new_file_mode())

    _atomic(Path(path), write)


def read_metadata(path) -> Dict[str, str]:
    path = Path(path)
    with _reading(path, _damaged_advice(path)), safe_open(str(path), framework='pt') as f:
        return dict(f.metadata() or {})


def load_weights(model: nn.Module, path, model_name: Optional[str] = None) -> Dict[str, str]:
    """Load safetensors weights into ``model``; a checkpoint of another architecture is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No checkpoint at {path}')
    meta = read_metadata(path)
    if model_name is not None and meta.get('model') not in (None, model_name):
        raise CheckpointMismatchError(f'{path} holds a {meta["model"]!r} model, not {model_name!r}')
    from safetensors.torch import load_file

    with _reading(path, _damaged_advice(path)):
        state = load_file(str(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:

        def few(keys):
            return ', '.join(keys[:5]) + (f' (+{len(keys) - 5} more)' if len(keys) > 5 else '')

        problems = [
            f'{name}: {few(keys)}'
            for name, keys in (
                ('missing keys', missing),
                ('unexpected keys', unexpected),
                ('shape mismatch', wrong_shape),
            )
            if keys
        ]
        raise CheckpointMismatchError(f'{path} does not fit {type(model).__name__} ({"; ".join(problems)})')
    model.load_state_dict(state)
    return meta


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        'torch': torch.get_rng_state(),
        'python': list(random.getstate()[1]),
        'python_version': random.getstate()[0],
        'python_gauss': random.getstate()[2],
        'numpy': torch.from_numpy(np_state[1].astype(np.int64)),
        'numpy_pos': int(np_state[2]),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    random.setstate((state['python_version'], tuple(state['python']), state['python_gauss']))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'], 0, 0.0))


def save_train_state(path, **state) -> None:
    _atomic(Path(path), lambda p: torch.save(state, p))


def load_train_state(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'No training state at {path}')
    advice = f'restore it from a copy, or delete it and {WEIGHTS_LAST} from {path.parent} to train that run afresh'
    with _reading(path, advice):
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


def create_model_from_checkpoint(path, model_name: Optional[str] = None) -> Tuple[nn.Module, Dict[str, str]]:
    """Rebuild the model a ``python -m lab.train`` checkpoint (a file, or a run directory: its last.safetensors) was
    saved from and load its weights. The model name and kwargs come from the file's metadata (``model_name``
    overrides the name)."""
    import timm

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    name = model_name or meta.get('model')
    if not name:
        raise ValueError(f'{path} does not say which model it holds; pass the model name')
    kwargs = json.loads(meta.get('model_kwargs', '{}'))
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:  # kwargs of another model (--model names a different one than the checkpoint)
        raise CheckpointMismatchError(
            f'{path} was saved with model kwargs {kwargs} that {name} does not take: {e}'
        ) from e
    load_weights(model, path, name)
    return model, dict(meta, model=name, model_kwargs=json.dumps(kwargs))
