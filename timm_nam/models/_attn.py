"""Named attention kinds that the model families place in their blocks or between stages.

Models take these names (not classes) as constructor arguments, so their configs stay plain data
(timm's ``save_for_hf`` refuses class-valued model kwargs) and every variant has one name.
"""

import math
from typing import Optional, Tuple

import torch.nn as nn
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

from ..layers import BAM, NAM, ConstantScale, NAMChannel, NAMSpatial, SimAM, TripletAttention
from ..layers.nam_norm import for_nam

__all__ = [
    'BLOCK_ATTN_KINDS',
    'STAGE_ATTN_KINDS',
    'create_block_attn',
    'create_stage_attn',
    'feat_size_at',
    'nam_options',
    'norm_before_attn',
]

# Baselines use the NAM paper's reduction r=16 with hidden width C // 16; these exact choices are the
# ones whose parameter counts equal the paper's Tables 1-2 (SE bias-free, CBAM's MLP with bias).
# kind -> (description, factory(channels, feat_size, **factory_kwargs))
_BLOCK_ATTN = {
    'nam_ch': ('NAM channel attention (Eq. 2)', lambda c, fs, **kw: NAMChannel(c, **kw)),
    'nam_sp': ('NAM spatial / pixel attention (Eq. 3)', lambda c, fs, **kw: NAMSpatial(c, feat_size=fs, **kw)),
    'nam': ('NAM channel then spatial attention', lambda c, fs, **kw: NAM(c, feat_size=fs, **kw)),
    'se': (
        'Squeeze-and-Excitation, r=16, bias-free FCs (timm SEModule)',
        lambda c, fs, **dd: SEModule(c, rd_channels=max(c // 16, 1), bias=False, **dd),
    ),
    'cbam': (
        'CBAM, r=16, k=7, MLP with bias (timm CbamModule)',
        lambda c, fs, **dd: CbamModule(c, rd_channels=max(c // 16, 1), mlp_bias=True, **dd),
    ),
    'tam': ('Triplet attention, k=7', lambda c, fs, **dd: TripletAttention(c, **dd)),
    'simam': ('SimAM, parameter-free, lambda=1e-4', lambda c, fs, **dd: SimAM(c)),
    'half': (
        "constant 0.5: NAM's initial gate without the gate (a control)",
        lambda c, fs, **dd: ConstantScale(c, 0.5),
    ),
}
_STAGE_ATTN = {
    'bam': ('BAM, r=16, dilation 4', lambda c, **dd: BAM(c, **dd)),
}
BLOCK_ATTN_KINDS = {kind: description for kind, (description, _) in _BLOCK_ATTN.items()}
STAGE_ATTN_KINDS = {kind: description for kind, (description, _) in _STAGE_ATTN.items()}


def _factory(kind: str, table: dict, what: str):
    if kind not in table:
        raise ValueError(f'Unknown {what} {kind!r}; expected one of {sorted(table)}')
    return table[kind][1]


def nam_options(weighting: str = 'sum', grad_through_weights: bool = False) -> dict:
    """The NAM layer options a model passes to its gates (see `timm_nam.NAMChannel`); only non-defaults are kept, so
    the baselines' layers never see them."""
    options = {}
    if weighting != 'sum':
        options['weighting'] = weighting
    if grad_through_weights:
        options['grad_through_weights'] = True
    return options


def create_block_attn(
    kind: str, channels: int, feat_size: Optional[Tuple[int, int]] = None, nam: Optional[dict] = None, **dd
) -> nn.Module:
    """Build the attention of ``kind`` for a block with ``channels`` outputs of size ``feat_size``; ``nam`` holds
    NAM layer options (`nam_options`), which only NAM kinds accept."""
    factory = _factory(kind, _BLOCK_ATTN, 'block attention')
    if nam and not kind.startswith('nam'):
        raise ValueError(f'NAM options {sorted(nam)} were given for block attention {kind!r}, which is not NAM')
    return factory(channels, feat_size, **(nam or {}), **_given(dd))


def norm_before_attn(norm: nn.Module, attn: Optional[nn.Module]) -> nn.Module:
    """The batch norm that feeds ``attn``, made NAM-aware (in place) when ``attn`` is a NAM gate, so that the gate
    trains without keeping a full-size tensor of its own (`timm_nam.layers.nam_norm`)."""
    if isinstance(attn, (NAMChannel, NAMSpatial, NAM)):
        return for_nam(norm)
    return norm


def create_stage_attn(kind: str, channels: int, **dd) -> nn.Module:
    """Build the attention of ``kind`` appended to a stage with ``channels`` outputs."""
    return _factory(kind, _STAGE_ATTN, 'stage attention')(channels, **_given(dd))


def _given(dd: dict) -> dict:
    """The factory kwargs (device, dtype) actually set: timm releases before 1.0.2x build SE and CBAM without them."""
    return {k: v for k, v in dd.items() if v is not None}


def feat_size_at(img_size: Tuple[int, int], reduction: int) -> Tuple[int, int]:
    """Feature map size after ``log2(reduction)`` stride-2 convs/pools with 'same'-style padding
    (kernel k, padding k//2), each of which maps h to ceil(h / 2)."""
    h, w = img_size
    while reduction > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        reduction //= 2
    return h, w
