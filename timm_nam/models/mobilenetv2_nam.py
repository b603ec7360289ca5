"""MobileNetV2 with NAM (and the NAM paper's Table 2 baselines) at the end of every block.

NAM sits after the projection norm of each inverted residual (and of the first, depthwise-separable block), before
the shortcut add: the paper's "end of each network block", in all 17 blocks. The models are timm's MobileNetV2
definition built as `AttnEfficientNet`, so timm's ``mobilenetv2_*`` weights convert to them exactly.

* ``mobilenetv2_nam`` = ``mobilenetv2_100_nam``: channel NAM, the configuration whose 3.51M matches the paper's
  Table 2 count; any input size, as every timm MobileNetV2. ``mobilenetv2_140_nam`` / ``mobilenetv2_050_nam``:
  width 1.4 / 0.5. ``mobilenetv2_{050,100,140}_nam_chsp``: channel then spatial NAM, as the paper's *text* says for
  its MobileNetV2 result (3.55M params at width 1.0); pixel attention fixes the input size (``img_size=``).
  ``mobilenetv2_100_nam_ch`` is the old name of ``mobilenetv2_100_nam`` (deprecated).
* ``mobilenetv2_100_se`` / ``_cbam`` / ``_bam``: the paper's Table 2 baselines (SE and CBAM at the same block-end
  position, BAM after each of the 7 stages).
"""

from functools import partial

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model, register_model_deprecations
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels

from ._cfg import plain_weights_cfgs
from .efficientnet_nam import AttnEfficientNet, create_attn_efficientnet, efficientnet_cfg

__all__ = []


def _gen_mobilenetv2(variant: str, channel_multiplier: float, pretrained: bool = False, **kwargs):
    """timm's MobileNetV2 definition (``_gen_mobilenet_v2``), built as an `AttnEfficientNet`."""
    arch_def = [
        ['ds_r1_k3_s1_c16'],
        ['ir_r2_k3_s2_e6_c24'],
        ['ir_r3_k3_s2_e6_c32'],
        ['ir_r4_k3_s2_e6_c64'],
        ['ir_r3_k3_s1_e6_c96'],
        ['ir_r3_k3_s2_e6_c160'],
        ['ir_r1_k3_s1_e6_c320'],
    ]
    round_chs_fn = partial(round_channels, multiplier=channel_multiplier)
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def),
        num_features=max(1280, round_chs_fn(1280)),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        act_layer=resolve_act_layer(kwargs, 'relu6'),
        **kwargs,
    )
    return create_attn_efficientnet(variant, pretrained, **model_kwargs)


# See resnet_nam.py: the plain network's timm weights, converted, are the default tag of each NAM model.
_PLAIN_WEIGHTS = {
    'mobilenetv2_nam': 'mobilenetv2_100.ra_in1k',
    'mobilenetv2_100_nam': 'mobilenetv2_100.ra_in1k',
    'mobilenetv2_140_nam': 'mobilenetv2_140.ra_in1k',
    'mobilenetv2_050_nam': 'mobilenetv2_050.lamb_in1k',
    'mobilenetv2_100_nam_chsp': 'mobilenetv2_100.ra_in1k',
    'mobilenetv2_140_nam_chsp': 'mobilenetv2_140.ra_in1k',
    'mobilenetv2_050_nam_chsp': 'mobilenetv2_050.lamb_in1k',
}
default_cfgs = generate_default_cfgs(
    plain_weights_cfgs(
        {
            'mobilenetv2_nam': efficientnet_cfg(),
            'mobilenetv2_100_nam': efficientnet_cfg(),
            'mobilenetv2_140_nam': efficientnet_cfg(),
            'mobilenetv2_050_nam': efficientnet_cfg(),
            'mobilenetv2_100_nam_chsp': efficientnet_cfg(fixed=True),
            'mobilenetv2_140_nam_chsp': efficientnet_cfg(fixed=True),
            'mobilenetv2_050_nam_chsp': efficientnet_cfg(fixed=True),
            'mobilenetv2_100_se': efficientnet_cfg(),
            'mobilenetv2_100_cbam': efficientnet_cfg(),
            'mobilenetv2_100_bam': efficientnet_cfg(),
        },
        _PLAIN_WEIGHTS,
    )
)


@register_model
def mobilenetv2_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.0) + channel NAM at every block end (same as mobilenetv2_100_nam)."""
    return _gen_mobilenetv2('mobilenetv2_nam', 1.0, pretrained, block_attn='nam', **kwargs)


@register_model
def mobilenetv2_100_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.0) + channel NAM at every block end (the paper's Table 2 parameter count)."""
    return _gen_mobilenetv2('mobilenetv2_100_nam', 1.0, pretrained, block_attn='nam', **kwargs)


@register_model
def mobilenetv2_140_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.4) + channel NAM at every block end."""
    return _gen_mobilenetv2('mobilenetv2_140_nam', 1.4, pretrained, block_attn='nam', **kwargs)


@register_model
def mobilenetv2_050_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 0.5) + channel NAM at every block end."""
    return _gen_mobilenetv2('mobilenetv2_050_nam', 0.5, pretrained, block_attn='nam', **kwargs)


@register_model
def mobilenetv2_100_nam_chsp(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.0) + channel then spatial NAM at every block end (the paper's text); fixed input size."""
    return _gen_mobilenetv2('mobilenetv2_100_nam_chsp', 1.0, pretrained, block_attn='nam_chsp', **kwargs)


@register_model
def mobilenetv2_140_nam_chsp(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.4) + channel then spatial NAM at every block end; fixed input size."""
    return _gen_mobilenetv2('mobilenetv2_140_nam_chsp', 1.4, pretrained, block_attn='nam_chsp', **kwargs)


@register_model
def mobilenetv2_050_nam_chsp(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 0.5) + channel then spatial NAM at every block end; fixed input size."""
    return _gen_mobilenetv2('mobilenetv2_050_nam_chsp', 0.5, pretrained, block_attn='nam_chsp', **kwargs)


@register_model
def mobilenetv2_100_se(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 + SE (r=16, bias-free) at every block end (paper Table 2 baseline)."""
    return _gen_mobilenetv2('mobilenetv2_100_se', 1.0, pretrained, block_attn='se', **kwargs)


@register_model
def mobilenetv2_100_cbam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 + CBAM (r=16, k=7) at every block end (paper Table 2 baseline)."""
    return _gen_mobilenetv2('mobilenetv2_100_cbam', 1.0, pretrained, block_attn='cbam', **kwargs)


@register_model
def mobilenetv2_100_bam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 + BAM after each of the 7 stages (paper Table 2 baseline)."""
    return _gen_mobilenetv2('mobilenetv2_100_bam', 1.0, pretrained, stage_attn='bam', **kwargs)


register_model_deprecations(__name__, {'mobilenetv2_100_nam_ch': 'mobilenetv2_100_nam'})
