"""From plain timm weights to NAM: pretrained NAM networks without NAM training.

A fresh NAM gate with scale s, shift 0 and the running statistics of the tensor it gates is, in eval mode,
``sigmoid(k·x̂) = 0.5 + k·x̂/4 + O(k³)`` (``x̂`` that tensor standardized, ``k = w·s`` the gate's slope), so a NAM
network is its plain network with each gated tensor halved. Loading plain weights, the conversion doubles the affine of
every norm NAM gates (once per gate that follows it), gives each gate the running statistics of the tensor it gates
(from that norm's state; per pixel, pooled over channels), and starts each gate at ``s = min(SCALE_INIT, GATE_SLOPE /
w)`` (`start_scale`), which bounds every gate's slope. What remains is each gate's first-order term; how large it is
on real and random weights: results/pretrained_conversion/.
"""

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .layers import ConstantScale, NAMChannel, NAMChannelSpatial, NAMSpatial, NormNAM
from .models._attn import nam_options
from .models._placement import insert_nam, model_name

__all__ = ['add_nam', 'load_plain_weights', 'plain_to_nam_state_dict', 'start_scale', 'SCALE_INIT', 'GATE_SLOPE']

# NAM's scale γ at the start of a converted gate, and the largest slope w·γ it may start with (module docstring)
SCALE_INIT = 0.5
GATE_SLOPE = 1 / 256

StateDict = Dict[str, torch.Tensor]


def _gates(nam: nn.Module) -> List[Tuple[Optional[nn.Module], float]]:
    """The gates of a site in the order they apply (channel, then spatial), each with the factor that undoes it at
    the start: a fresh NAM gate is about 0.5, a constant scale is its value (and has no state of its own)."""
    if isinstance(nam, NAMChannelSpatial):
        return [(nam.channel, 2.0), (nam.spatial, 2.0)]
    if isinstance(nam, (NAMChannel, NAMSpatial)):
        return [(nam, 2.0)]
    if isinstance(nam, ConstantScale):
        return [(None, 1.0 / nam.value)]
    raise ValueError(f'a {type(nam).__name__} cannot be loaded from plain weights (fold NAM after loading)')


def _norm_output_stats(plain: StateDict, prefix: str, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and variance of the plain norm's output, from its parameters and running statistics."""
    gamma, beta, var = (plain[f'{prefix}{k}'].double() for k in ('weight', 'bias', 'running_var'))
    return beta, gamma.square() * var / (var + eps)


def start_scale(gate: nn.Module, scale_init: float = SCALE_INIT, max_slope: float = GATE_SLOPE) -> float:
    """The scale a converted gate starts with: ``scale_init``, or less where the gate's slope at the start, its weight
    times its scale (``s/n`` with the paper's weighting over n channels or pixels, ``s`` with ``'mean'``), would
    exceed ``max_slope``."""
    weight = 1.0 / gate.bn.num_features if gate.weighting == 'sum' else 1.0
    return min(scale_init, max_slope / weight)


def _gate_state(gate: nn.Module, mean: torch.Tensor, var: torch.Tensor, scale: float) -> StateDict:
    """A fresh gate's state (scale ``scale``, shift 0) with the running statistics of its input, whose per-channel
    mean and variance are ``mean`` and ``var``."""
    bn = gate.bn
    if isinstance(gate, NAMSpatial):  # per pixel, over channels (the law of total variance): alike at every pixel
        pixel_mean = mean.mean()
        pixel_var = (var + (mean - pixel_mean).square()).mean()
        mean, var = pixel_mean.expand(bn.num_features), pixel_var.expand(bn.num_features)
    like = dict(dtype=bn.running_mean.dtype, device=bn.running_mean.device)
    return {
        'weight': torch.full_like(bn.weight, scale),
        'bias': torch.zeros_like(bn.bias),
        'running_mean': mean.to(**like).clone(),
        'running_var': var.to(**like).clone(),
        'num_batches_tracked': torch.zeros_like(bn.num_batches_tracked),
    }


def plain_to_nam_state_dict(
    state_dict: StateDict, model: nn.Module, scale_init: float = SCALE_INIT, max_slope: float = GATE_SLOPE
) -> StateDict:
    """The state dict of a plain timm network of ``model``'s architecture, converted for ``model`` (its NAM form; see
    the module docstring). A state dict that already has NAM's keys is returned unchanged, so this serves as the
    ``pretrained_filter_fn`` of every NAM model. Raises ValueError naming the norm whose weights are missing or
    mis-shaped."""
    sites = [(name, m) for name, m in model.named_modules() if isinstance(m, NormNAM)]
    if not sites or any(k.startswith(f'{sites[0][0]}.norm.') for k in state_dict):
        return state_dict
    out = dict(state_dict)
    for name, site in sites:
        prefix, channels = f'{name}.', site.norm.num_features
        for key in ('weight', 'bias', 'running_mean', 'running_var'):
            tensor = out.pop(f'{prefix}{key}', None)
            if tensor is None:
                raise ValueError(
                    f'the weights have no {prefix}{key} for the norm that NAM gates at {name} '
                    '(are they weights of the same architecture without NAM?)'
                )
            if tensor.shape != (channels,):
                raise ValueError(
                    f'{prefix}{key} has shape {tuple(tensor.shape)}; the norm NAM gates at {name} has {channels} '
                    'channels (are they weights of the same architecture without NAM?)'
                )
            out[f'{prefix}norm.{key}'] = tensor
        if f'{prefix}num_batches_tracked' in out:
            out[f'{prefix}norm.num_batches_tracked'] = out.pop(f'{prefix}num_batches_tracked')
        gates = _gates(site.nam)
        gain = math.prod(factor for _, factor in gates)
        mean, var = _norm_output_stats(out, f'{prefix}norm.', site.norm.eps)
        for key in ('weight', 'bias'):
            out[f'{prefix}norm.{key}'] = out[f'{prefix}norm.{key}'] * gain
        mean, var = mean * gain, var * gain**2
        for gate, factor in gates:
            if gate is not None:
                gate_prefix = f'{prefix}nam.' + ('bn.' if gate is site.nam else f'{_child_name(site.nam, gate)}.bn.')
                scale = start_scale(gate, scale_init, max_slope)
                out.update({f'{gate_prefix}{k}': v for k, v in _gate_state(gate, mean, var, scale).items()})
            mean, var = mean / factor, var / factor**2
    return out


def _child_name(parent: nn.Module, child: nn.Module) -> str:
    return next(name for name, m in parent.named_children() if m is child)


def _read_weights(source) -> Tuple[StateDict, str]:
    """A state dict and a description of where it came from."""
    if isinstance(source, nn.Module):
        return source.state_dict(), f'a {type(source).__name__}'
    if isinstance(source, dict):
        return source, 'the given state dict'
    if Path(source).is_file():
        from .train_run import read_state_dict

        return read_state_dict(source), str(source)
    import timm

    if timm.is_model(str(source)) or str(source).startswith('hf-hub:'):
        return timm.create_model(str(source), pretrained=True).state_dict(), str(source)
    raise FileNotFoundError(f'{source} is neither a weights file nor a timm model name')


def load_plain_weights(
    model: nn.Module,
    source: Union[str, Path, dict, nn.Module],
    scale_init: float = SCALE_INIT,
    max_slope: float = GATE_SLOPE,
) -> nn.Module:
    """Load a plain timm network's weights into the NAM model ``model``, converted (module docstring).

    ``source``: a plain timm model (``nn.Module``), its state dict, a ``.safetensors`` / ``.pth`` file, or a timm
    model name with pretrained weights (``'resnet50.tv2_in1k'``, ``'hf-hub:timm/...'``; read from the Hub or its
    cache). A classifier of another class count is left as initialised, as timm's ``pretrained=True`` does; anything
    else that does not fit is an error naming the model, the source and torch's list of what does not fit.
    """
    state, where = _read_weights(source)
    try:
        state = plain_to_nam_state_dict(state, model, scale_init, max_slope)
        own = model.state_dict()
        classifier = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or '\0'
        for key in [k for k in own if k.startswith(f'{classifier}.') and k in state]:
            if state[key].shape != own[key].shape:
                state[key] = own[key]  # another class count: the new head stays as initialised
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as e:
        raise ValueError(f'Cannot load {where} into {model_name(model)}: {e}') from None
    return model


def add_nam(
    model: nn.Module,
    kind: str = 'nam',
    img_size=None,
    blocks_without_skip: bool = False,
    scale_init: float = SCALE_INIT,
    max_slope: float = GATE_SLOPE,
    weighting: str = 'sum',
    grad_through_weights: bool = False,
) -> nn.Module:
    """Put NAM gates into a timm network, in place, after the batch norm that ends every residual branch (found from
    the network's graph, `timm_nam.models.nam_sites`), keeping what it computes: its weights are converted (module
    docstring), so a pretrained network stays pretrained. Returns the model, ready to train with
    `timm_nam.NAMSparsityLoss` or `timm_nam.enable_penalty` (whose default p follows from what it is built from).

    Args:
        model: a timm network, pretrained or not.
        kind: 'nam' (channel attention), 'nam_sp' (spatial) or 'nam_chsp' (channel then spatial), as the suffixes of
            the registered models; spatial kinds need ``img_size``. 'half', the control, puts NAM's start in place of
            each gate: a constant 0.5, the norm's affine doubled.
        blocks_without_skip: also gate the inverted-residual blocks without a skip, as the paper counts MobileNetV2's
            17 and the registered models do; off by default, as these blocks carry most of the conversion's error.
        scale_init, max_slope: NAM's start, ``min(scale_init, max_slope / w)`` (module docstring).
        weighting, grad_through_weights: the NAM layers' options (`timm_nam.NAMChannel`).

    A network where no residual branch ends in a batch norm raises a `timm_nam.models.NAMPlacementError` (a
    ValueError) naming it and the case, and is left unchanged.
    """
    plain = model.state_dict()
    options = nam_options(kind, weighting, grad_through_weights)
    insert_nam(model, kind, img_size=img_size, blocks_without_skip=blocks_without_skip, **options)
    model.load_state_dict(plain_to_nam_state_dict(plain, model, scale_init, max_slope))
    return model
