"""MobileNetV2 with NAM (and the NAM paper's Table 2 baselines) at the end of every block: timm's MobileNetV2, built
by timm, so timm's ``mobilenetv2_*`` weights convert to them.

NAM sits after the projection norm of each inverted residual (and of the first, depthwise-separable block), before
the shortcut add: the paper's "end of each network block", in all 17 blocks.

Channel NAM (``_nam``) is the configuration whose 3.51M matches the paper's Table 2 count; channel then spatial
(``_nam_chsp``, 3.55M, fixed input size) is what the paper's *text* says. The Table 2 baselines: SE and CBAM at the
block end (the projection norm's activation slot), BAM after each of the 7 stages.
"""

from functools import partial

from timm.models import EfficientNet, generate_default_cfgs, register_model, register_model_deprecations

from ._builder import build_nam_model
from ._cfg import nam_cfg, plain_cfg

__all__ = []


_cfg = partial(nam_cfg, 'conv_stem', 'classifier', interpolation='bicubic')
default_cfgs = generate_default_cfgs(
    {
        'mobilenetv2_nam.plain_ra_in1k': plain_cfg('mobilenetv2_100.ra_in1k', _cfg()),
        'mobilenetv2_100_nam.plain_ra_in1k': plain_cfg('mobilenetv2_100.ra_in1k', _cfg()),
        'mobilenetv2_140_nam.plain_ra_in1k': plain_cfg('mobilenetv2_140.ra_in1k', _cfg()),
        'mobilenetv2_050_nam.plain_lamb_in1k': plain_cfg('mobilenetv2_050.lamb_in1k', _cfg()),
        'mobilenetv2_100_nam_chsp.plain_ra_in1k': plain_cfg('mobilenetv2_100.ra_in1k', _cfg(fixed_input_size=True)),
        'mobilenetv2_140_nam_chsp.plain_ra_in1k': plain_cfg('mobilenetv2_140.ra_in1k', _cfg(fixed_input_size=True)),
        'mobilenetv2_050_nam_chsp.plain_lamb_in1k': plain_cfg('mobilenetv2_050.lamb_in1k', _cfg(fixed_input_size=True)),
        'mobilenetv2_100_se': _cfg(),
        'mobilenetv2_100_cbam': _cfg(),
        'mobilenetv2_100_bam': _cfg(),
    }
)
# features_only goes through timm's generic FeatureListNet over the model's feature_info
_build = partial(build_nam_model, feature_cfg=dict(flatten_sequential=True))


@register_model
def mobilenetv2_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 1.0) + channel NAM at every block end (same as mobilenetv2_100_nam)."""
    return _build('mobilenetv2_nam', pretrained, 'mobilenetv2_100', dict(block_attn='nam'), **kwargs)


@register_model
def mobilenetv2_100_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 1.0) + channel NAM at every block end (the paper's Table 2 parameter count)."""
    return _build('mobilenetv2_100_nam', pretrained, 'mobilenetv2_100', dict(block_attn='nam'), **kwargs)


@register_model
def mobilenetv2_140_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 1.4) + channel NAM at every block end."""
    return _build('mobilenetv2_140_nam', pretrained, 'mobilenetv2_140', dict(block_attn='nam'), **kwargs)


@register_model
def mobilenetv2_050_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 0.5) + channel NAM at every block end."""
    return _build('mobilenetv2_050_nam', pretrained, 'mobilenetv2_050', dict(block_attn='nam'), **kwargs)


@register_model
def mobilenetv2_100_nam_chsp(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 1.0) + channel then spatial NAM at every block end (the paper's text); fixed input size."""
    return _build('mobilenetv2_100_nam_chsp', pretrained, 'mobilenetv2_100', dict(block_attn='nam_chsp'), **kwargs)


@register_model
def mobilenetv2_140_nam_chsp(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 1.4) + channel then spatial NAM at every block end; fixed input size."""
    return _build('mobilenetv2_140_nam_chsp', pretrained, 'mobilenetv2_140', dict(block_attn='nam_chsp'), **kwargs)


@register_model
def mobilenetv2_050_nam_chsp(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 (width 0.5) + channel then spatial NAM at every block end; fixed input size."""
    return _build('mobilenetv2_050_nam_chsp', pretrained, 'mobilenetv2_050', dict(block_attn='nam_chsp'), **kwargs)


@register_model
def mobilenetv2_100_se(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 + SE (r=16, bias-free) at every block end (paper Table 2 baseline)."""
    return _build('mobilenetv2_100_se', pretrained, 'mobilenetv2_100', dict(block_attn='se'), **kwargs)


@register_model
def mobilenetv2_100_cbam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 + CBAM (r=16, k=7) at every block end (paper Table 2 baseline)."""
    return _build('mobilenetv2_100_cbam', pretrained, 'mobilenetv2_100', dict(block_attn='cbam'), **kwargs)


@register_model
def mobilenetv2_100_bam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNetV2 + BAM after each of the 7 stages (paper Table 2 baseline)."""
    stages = [f'blocks.{i}' for i in range(7)]
    return _build('mobilenetv2_100_bam', pretrained, 'mobilenetv2_100', dict(stage_attn='bam', stages=stages), **kwargs)


register_model_deprecations(__name__, {'mobilenetv2_100_nam_ch': 'mobilenetv2_100_nam'})
