"""RegNets with NAM: timm's RegNetY, built by timm, with channel NAM after the norm that ends every block's residual
branch (its third conv's), before the add, where `timm_nam.add_nam` places it; RegNetY's own SE stays inside the
branch.

* ``regnety_008_nam`` / ``regnety_016_nam``: RegNetY-800MF / -1.6GF with channel NAM in every block.
"""

from timm.models import RegNet, generate_default_cfgs, register_model

from ._builder import build_nam_model
from ._cfg import nam_cfg, plain_cfg

__all__ = []

_BASE = nam_cfg('stem.conv', 'head.fc')
default_cfgs = generate_default_cfgs(
    {
        'regnety_008_nam.plain_pycls_in1k': plain_cfg('regnety_008.pycls_in1k', _BASE),
        'regnety_016_nam.plain_tv2_in1k': plain_cfg('regnety_016.tv2_in1k', _BASE),
    }
)


@register_model
def regnety_008_nam(pretrained: bool = False, **kwargs) -> RegNet:
    """RegNetY-800MF + channel NAM in every block."""
    return build_nam_model('regnety_008_nam', pretrained, 'regnety_008', dict(block_attn='nam'), **kwargs)


@register_model
def regnety_016_nam(pretrained: bool = False, **kwargs) -> RegNet:
    """RegNetY-1.6GF + channel NAM in every block."""
    return build_nam_model('regnety_016_nam', pretrained, 'regnety_016', dict(block_attn='nam'), **kwargs)
