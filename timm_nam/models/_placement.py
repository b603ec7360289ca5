"""Where NAM goes in timm's networks: after the last norm of every residual / inverted-residual block.

One table says which norm that is for each timm block type; `insert_nam` replaces each such norm with a `NormNAM`
(the norm, the gate on its output, and the activation that followed the norm, if any). The registered models and
`timm_nam.add_nam` both place NAM this way, so a plain timm network with NAM added has the structure, state-dict keys
and behaviour of the registered NAM model of the same architecture.
"""

import functools
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from ..layers import NAM, NAMChannel, NAMSpatial, NormNAM, norm_nam

__all__ = ['NAM_KINDS', 'nam_sites', 'insert_nam', 'create_nam', 'NAMPlacementError']

# NAM kinds as the model names' suffixes say them
NAM_KINDS = {
    'nam': 'channel attention (Eq. 2)',
    'nam_sp': 'spatial / pixel attention (Eq. 3)',
    'nam_chsp': 'channel then spatial attention',
}
_LAYERS = {'nam': NAMChannel, 'nam_sp': NAMSpatial, 'nam_chsp': NAM}


class NAMPlacementError(ValueError):
    """NAM cannot be placed in this network (it names the network and the reason)."""


@functools.lru_cache(maxsize=None)
def _block_norms() -> Tuple[Tuple[type, str, bool], ...]:
    """(timm block type, path of the norm whose output ends its residual branch, whether only blocks with a skip
    connection count). The inverted-residual family counts with or without skip, as the paper's MobileNetV2 does."""
    from timm.models import _efficientnet_blocks as eb
    from timm.models import cspnet, regnet, resnet

    return (
        (resnet.BasicBlock, 'bn2', False),
        (resnet.Bottleneck, 'bn3', False),
        (eb.DepthwiseSeparableConv, 'bn2', False),
        (eb.InvertedResidual, 'bn3', False),  # also CondConvResidual
        (eb.EdgeResidual, 'bn2', False),
        (eb.ConvBnAct, 'bn1', True),  # a plain conv block, residual only with its skip
        (regnet.Bottleneck, 'conv3.bn', False),
        (cspnet.BottleneckBlock, 'conv3.bn', False),
        (cspnet.DarkBlock, 'conv2.bn', False),
        (cspnet.EdgeBlock, 'conv2.bn', False),
    )


def _norm_path(block: nn.Module) -> Optional[str]:
    for block_type, path, skip_only in _block_norms():
        if isinstance(block, block_type):
            return path if not skip_only or block.has_skip else None
    return None


def nam_sites(model: nn.Module) -> List[str]:
    """The names of the norms NAM gates in ``model``: the last norm of each residual block of a kind in the table."""
    return [f'{name}.{path}' if name else path for name, m in model.named_modules() if (path := _norm_path(m))]


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return cfg.get('architecture') or type(model).__name__


def _check_sites(model: nn.Module, sites: List[str]) -> None:
    name = _model_name(model)
    if not sites:
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        known = sorted({f'{t.__module__.split(".")[-1]}.{t.__name__}' for t, _, _ in _block_norms()})
        reason = (
            "it has no batch norm (NAM gates a batch norm's output with that norm's statistics)"
            if not has_bn
            else f'none of its blocks is a residual block of a layout NAM knows ({", ".join(known)})'
        )
        raise NAMPlacementError(f'Cannot add NAM to {name}: {reason}')
    problems = []
    for site in sites:
        norm = model.get_submodule(site)
        if isinstance(norm, NormNAM):
            problems.append(f'{site} already has a NAM gate')
        elif not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.weight is None:
            problems.append(f'{site} is a {type(norm).__name__}, not an affine batch norm')
    if problems:
        shown = '; '.join(problems[:4]) + (f' (+{len(problems) - 4} more)' if len(problems) > 4 else '')
        raise NAMPlacementError(f'Cannot add NAM to {name}: {shown}')


def _feature_sizes(model: nn.Module, sites: List[str], img_size) -> Dict[str, Tuple[int, int]]:
    """The (H, W) each site's norm sees for an ``img_size`` input: one forward pass in eval mode, no gradients."""
    if img_size is None:
        raise NAMPlacementError(f'{_model_name(model)}: spatial NAM needs img_size= (one scale per pixel position)')
    sizes, handles = {}, []
    for site in sites:
        hook = functools.partial(lambda s, m, i, o: sizes.__setitem__(s, tuple(o.shape[-2:])), site)
        handles.append(model.get_submodule(site).register_forward_hook(hook))
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(first_conv.weight.new_zeros(1, first_conv.in_channels, *to_2tuple(img_size)))
    finally:
        for m, mode in training.items():
            m.training = mode
        for h in handles:
            h.remove()
    return sizes


def create_nam(kind: str, channels: int, feat_size=None, **options) -> nn.Module:
    """The NAM gate of ``kind`` (a key of `NAM_KINDS`) for ``channels`` at ``feat_size``; ``options`` are the layers'
    (``weighting``, ``grad_through_weights``, ``device``, ``dtype``)."""
    if kind not in _LAYERS:
        raise ValueError(f'Unknown NAM kind {kind!r}; expected one of {sorted(NAM_KINDS)}')
    if kind != 'nam':
        options['feat_size'] = feat_size
    return _LAYERS[kind](channels, **options)


def insert_nam(model: nn.Module, kind: str = 'nam', img_size=None, **options) -> nn.Module:
    """Put a NAM gate of ``kind`` after the last norm of every residual block of ``model``, in place, and return it.

    Every site is checked before anything changes: a network NAM cannot be placed in raises `NAMPlacementError`
    and is left as it was. ``img_size`` is needed for spatial kinds; ``options`` go to the NAM layers.
    """
    if kind not in _LAYERS:
        raise ValueError(f'Unknown NAM kind {kind!r}; expected one of {sorted(NAM_KINDS)}')
    sites = nam_sites(model)
    _check_sites(model, sites)
    feat_sizes = _feature_sizes(model, sites, img_size) if kind != 'nam' else {}
    for site in sites:
        norm = model.get_submodule(site)
        act = getattr(norm, 'act', None)
        if act is not None and not isinstance(act, nn.Identity):
            norm.act = nn.Identity()  # the gate goes between the norm and its activation
        else:
            act = None
        dd = dict(device=norm.weight.device, dtype=norm.weight.dtype)
        gate = create_nam(kind, norm.num_features, feat_sizes.get(site), **options, **dd)
        parent, _, attr = site.rpartition('.')
        setattr(model.get_submodule(parent), attr, norm_nam(norm, gate, act).train(norm.training))
    return model
