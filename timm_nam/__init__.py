"""timm-nam: NAM (Normalization-based Attention Module) for timm.

``import timm`` loads ``timm_nam.models`` (and so this package) through the ``timm.plugins`` entry point, so
this module stays light: the penalty, training and Hub helpers are imported on first use.
"""

from . import models  # registers the models
from .layers import (
    BAM,
    ConstantScale,
    NAMChannel,
    NAMChannelSpatial,
    NAMGate,
    NAMSpatial,
    SimAM,
    TripletAttention,
    nam_weights,
)

__version__ = '0.2.0.dev0'

_LAZY = {
    'NAMSparsityLoss': 'penalty',
    'enable_penalty': 'penalty',
    'disable_penalty': 'penalty',
    'nam_scales': 'penalty',
    'paper_penalty': 'penalty',
    'add_nam': 'convert',
    'load_plain_weights': 'convert',
    'export_run': 'hub',
    'publish': 'hub',
    'count_flops': 'flops',
}


def __getattr__(name):
    if name == 'NAM':
        from . import layers

        return layers.NAM  # deprecated: NAMChannelSpatial
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'NAMChannel',
    'NAMChannelSpatial',
    'NAMSpatial',
    'NAMGate',
    'BAM',
    'TripletAttention',
    'SimAM',
    'ConstantScale',
    'nam_weights',
    *_LAZY,
]
