"""The NAM paper's baselines (and NAM's controls), by name, for the models that place them in blocks or after stages.

Models take these names (not classes) as constructor arguments, so their configs stay plain data (timm's
``save_for_hf`` refuses class-valued model kwargs) and every variant has one name. NAM itself is placed by
`timm_nam.models._placement`.
"""

from typing import Optional

import torch.nn as nn
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

from ..layers import BAM, ConstantScale, SimAM, TripletAttention
from ._placement import NAM_KINDS

__all__ = ['BLOCK_ATTN_KINDS', 'STAGE_ATTN_KINDS', 'create_block_attn', 'create_stage_attn', 'nam_options']

# Baselines use the NAM paper's reduction r=16 with hidden width C // 16; these exact choices are the ones whose
# parameter counts equal the paper's Tables 1-2 (SE bias-free, CBAM's MLP with bias).
# kind -> (description, factory(channels, **factory_kwargs))
_BLOCK_ATTN = {
    'se': (
        'Squeeze-and-Excitation, r=16, bias-free FCs (timm SEModule)',
        lambda c, **dd: SEModule(c, rd_channels=max(c // 16, 1), bias=False, **dd),
    ),
    'cbam': (
        'CBAM, r=16, k=7, MLP with bias (timm CbamModule)',
        lambda c, **dd: CbamModule(c, rd_channels=max(c // 16, 1), mlp_bias=True, **dd),
    ),
    'tam': ('Triplet attention, k=7', lambda c, **dd: TripletAttention(c, **dd)),
    'simam': ('SimAM, parameter-free, lambda=1e-4', lambda c, **dd: SimAM(c)),
    'half': ("constant 0.5: NAM's initial gate without the gate (a control)", lambda c, **dd: ConstantScale(c, 0.5)),
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


def create_block_attn(kind: str, channels: int, **dd) -> nn.Module:
    """Build the baseline attention of ``kind`` for a block with ``channels`` outputs."""
    return _factory(kind, _BLOCK_ATTN, 'block attention')(channels, **_given(dd))


def create_stage_attn(kind: str, channels: int, **dd) -> nn.Module:
    """Build the attention of ``kind`` appended to a stage with ``channels`` outputs."""
    return _factory(kind, _STAGE_ATTN, 'stage attention')(channels, **_given(dd))


def _given(dd: dict) -> dict:
    """The factory kwargs (device, dtype) actually set: timm releases before 1.0.2x build SE and CBAM without them."""
    return {k: v for k, v in dd.items() if v is not None}


def nam_options(block_attn: Optional[str], weighting: str = 'sum', grad_through_weights: bool = False) -> dict:
    """Check a model's block attention (a NAM kind, a baseline or None) and return the NAM layer options it passes to
    its gates: only non-defaults, and only to NAM (a baseline given NAM options is an error)."""
    if block_attn is not None and block_attn not in NAM_KINDS and block_attn not in BLOCK_ATTN_KINDS:
        raise ValueError(f'Unknown block attention {block_attn!r}; expected one of {[*NAM_KINDS, *BLOCK_ATTN_KINDS]}')
    options = {}
    if weighting != 'sum':
        options['weighting'] = weighting
    if grad_through_weights:
        options['grad_through_weights'] = True
    if options and block_attn not in NAM_KINDS:
        raise ValueError(
            f'NAM options {sorted(options)} were given for a model whose block attention is {block_attn!r}'
        )
    return options
