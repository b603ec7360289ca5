"""EfficientNets with NAM at the end of every block: timm's networks, built by timm, NAM after the projection
(pointwise-linear) norm of each block, before the shortcut add, in every block as the paper counts MobileNetV2's:
channel NAM in ``efficientnet_b0_nam`` (EfficientNet-B0, its own SE kept) and ``efficientnet_lite0_nam``.
"""

from functools import partial

from timm.models import EfficientNet, generate_default_cfgs, register_model

from ._builder import build_nam_model
from ._cfg import nam_cfg, plain_cfg

__all__ = []

_BASE = nam_cfg('conv_stem', 'classifier', interpolation='bicubic')
default_cfgs = generate_default_cfgs(
    {
        'efficientnet_b0_nam.plain_ra_in1k': plain_cfg('efficientnet_b0.ra_in1k', _BASE),
        'efficientnet_lite0_nam.plain_ra_in1k': plain_cfg('efficientnet_lite0.ra_in1k', _BASE),
    }
)
# features_only goes through timm's generic FeatureListNet over the model's feature_info
_build = partial(build_nam_model, feature_cfg=dict(flatten_sequential=True))


@register_model
def efficientnet_b0_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-B0 (with its SE) + channel NAM at every block end."""
    return _build('efficientnet_b0_nam', pretrained, 'efficientnet_b0', dict(block_attn='nam'), **kwargs)


@register_model
def efficientnet_lite0_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-Lite0 + channel NAM at every block end."""
    return _build('efficientnet_lite0_nam', pretrained, 'efficientnet_lite0', dict(block_attn='nam'), **kwargs)
