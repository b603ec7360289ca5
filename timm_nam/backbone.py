"""Plain timm backbones into NAM models: a NAM model is its backbone plus NAM layers, so timm's own ``resnet50`` or
``mobilenetv2_100`` weights give it a pretrained start (backbone from the checkpoint, NAM layers fresh)."""

from pathlib import Path
from typing import Dict, List, Union

import timm
import torch
import torch.nn as nn

from .layers import NAMChannel, NAMSpatial

__all__ = ['load_backbone_weights']


def _read_state_dict(source: Union[str, Path, dict]) -> Dict[str, torch.Tensor]:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if path.is_file():
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location='cpu', weights_only=True)
        return state.get('state_dict', state) if isinstance(state, dict) else state
    if timm.is_model(str(source)):  # a timm model name: its pretrained weights (downloads unless cached)
        return timm.create_model(str(source), pretrained=True).state_dict()
    raise FileNotFoundError(f'{source} is neither a checkpoint file nor a timm model name')


def load_backbone_weights(model: nn.Module, source: Union[str, Path, dict]) -> Dict[str, List[str]]:
    """Load a plain timm backbone (e.g. timm's ``resnet50`` or ``mobilenetv2_100`` weights) into a NAM model.

    Every backbone tensor must be present with the right shape; the NAM layers keep their fresh init, and a
    classifier whose class count differs is left as initialized. Returns what was loaded and what was not.
    """
    state = _read_state_dict(source)
    own = model.state_dict()
    nam_prefixes = tuple(f'{n}.' for n, m in model.named_modules() if isinstance(m, (NAMChannel, NAMSpatial)))
    classifier = model.pretrained_cfg.get('classifier') if hasattr(model, 'pretrained_cfg') else None
    classifier_keys = {f'{classifier}.weight', f'{classifier}.bias'} if classifier else set()
    loaded, skipped_head, problems = {}, [], []
    for key, tensor in own.items():
        if key.startswith(nam_prefixes):
            continue
        if key not in state:
            if key.endswith('num_batches_tracked'):
                continue
            problems.append(f'missing {key}')
        elif state[key].shape != tensor.shape:
            if key in classifier_keys:
                skipped_head.append(key)
            else:
                problems.append(f'shape of {key}: checkpoint {tuple(state[key].shape)}, model {tuple(tensor.shape)}')
        else:
            loaded[key] = state[key]
    extra = sorted(set(state) - set(own))
    problems += [f'unexpected {k}' for k in extra]
    if problems:
        shown = '; '.join(problems[:6]) + (f' (+{len(problems) - 6} more)' if len(problems) > 6 else '')
        raise ValueError(f'checkpoint does not fit the backbone of {type(model).__name__}: {shown}')
    model.load_state_dict(loaded, strict=False)
    return {
        'loaded': sorted(loaded),
        'nam_fresh': sorted(k for k in own if k.startswith(nam_prefixes)),
        'classifier_skipped': skipped_head,
    }
