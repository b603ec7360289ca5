"""Every attention a timm-nam model names, in one table: NAM's three kinds, placed after the norm that ends each block
(`timm_nam.models._placement`), and the paper's baselines and NAM's controls, at that place or after stages.

Models take these names (not classes) as arguments, so their configs stay plain data (timm's ``save_for_hf`` refuses
class-valued model kwargs) and every variant has one name. The baselines use the NAM paper's reduction r=16 with
hidden width C // 16; these choices are the ones whose parameter counts equal the paper's Tables 1-2 (SE bias-free,
CBAM's MLP with bias).
"""

from functools import partial
from typing import Optional

import torch.nn as nn
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

from ..layers import BAM, ConstantScale, NAMChannel, NAMChannelSpatial, NAMSpatial, SimAM, TripletAttention

__all__ = ['NAM_KINDS', 'SITE_KINDS', 'BLOCK_KINDS', 'create_attn', 'factory_kwargs', 'nam_options']

# kind -> (what it is, where it goes, factory(channels, **options))
_TABLE = {
    'nam': ('channel NAM (Eq. 2)', 'block', NAMChannel),
    'nam_sp': ('spatial / pixel NAM (Eq. 3)', 'block', NAMSpatial),
    'nam_chsp': ('channel then spatial NAM', 'block', NAMChannelSpatial),
    'se': (
        'Squeeze-and-Excitation, r=16, bias-free FCs (timm SEModule)',
        'block',
        lambda c, **dd: SEModule(c, rd_channels=max(c // 16, 1), bias=False, **dd),
    ),
    'cbam': (
        'CBAM, r=16, k=7, MLP with bias (timm CbamModule)',
        'block',
        lambda c, **dd: CbamModule(c, rd_channels=max(c // 16, 1), mlp_bias=True, **dd),
    ),
    'tam': ('Triplet attention, k=7', 'block', TripletAttention),
    'simam': ('SimAM, parameter-free, lambda=1e-4', 'block', lambda c, **dd: SimAM(c)),
    'half': (
        "constant 0.5: NAM's initial gate without the gate (a control)",
        'block',
        partial(ConstantScale, value=0.5),
    ),
    'bam': ('BAM, r=16, dilation 4', 'stage', BAM),
}
NAM_KINDS = ('nam', 'nam_sp', 'nam_chsp')
# what add_nam places at NAM's sites and converts plain weights for: NAM, and the constant it starts as (a control)
SITE_KINDS = NAM_KINDS + ('half',)
BLOCK_KINDS = tuple(kind for kind, (_, where, _) in _TABLE.items() if where == 'block')


def create_attn(kind: str, channels: int, **options) -> nn.Module:
    """The attention of ``kind`` for ``channels`` channels; ``options`` are the layer's (NAM: ``feat_size``,
    ``weighting``, ``grad_through_weights``; all: ``device``, ``dtype``)."""
    if kind not in _TABLE:
        raise ValueError(f'Unknown attention {kind!r}; expected one of {sorted(_TABLE)}')
    return _TABLE[kind][2](channels, **options)


def factory_kwargs(module: nn.Module) -> dict:
    """The device and dtype (timm also builds on the meta device) of the module a new one joins or replaces."""
    return dict(device=module.weight.device, dtype=module.weight.dtype)


def nam_options(block_attn: Optional[str], weighting: str = 'sum', grad_through_weights: bool = False) -> dict:
    """Check a model's block attention (a block kind or None) and return the options it passes to its NAM gates: only
    non-defaults, and only to NAM (a baseline given NAM options is an error)."""
    if block_attn is not None and block_attn not in BLOCK_KINDS:
        raise ValueError(f'Unknown block attention {block_attn!r}; expected one of {list(BLOCK_KINDS)}')
    options = {'weighting': weighting} if weighting != 'sum' else {}
    if grad_through_weights:
        options['grad_through_weights'] = True
    if options and block_attn not in NAM_KINDS:
        raise ValueError(
            f'NAM options {sorted(options)} were given for a model whose block attention is {block_attn!r}'
        )
    return options
