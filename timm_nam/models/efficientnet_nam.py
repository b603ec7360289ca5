"""MobileNetV2 / EfficientNet-B0 with NAM (and the NAM paper's baselines) at the end of every block.

The paper puts NAM "at the end of each network block": after the projection (pointwise-linear) BN
of each inverted residual, before the shortcut add. timm's ``se_layer`` slot sits elsewhere (after
the depthwise conv), so these models use timm's blocks unchanged and place the attention in the
projection norm's activation slot (``bn3.act`` of an InvertedResidual, ``bn2.act`` of the first
DepthwiseSeparable block). That slot is an ``Identity`` in these architectures (the projection is
linear) and runs after the BN, before drop-path and the shortcut: exactly the paper's position.
Plain timm weights (``mobilenetv2_100``) keep their keys, so they load with ``strict=False``.

* ``mobilenetv2_nam`` = ``mobilenetv2_100_nam``: channel NAM, the configuration whose 3.51M matches the paper's
  Table 2 count; any input size, as every timm MobileNetV2. ``mobilenetv2_140_nam`` / ``mobilenetv2_050_nam``:
  width 1.4 / 0.5. ``mobilenetv2_{050,100,140}_nam_chsp``: channel then spatial NAM, as the paper's *text* says for
  its MobileNetV2 result (3.55M params at width 1.0); pixel attention fixes the input size (``img_size=``).
  ``mobilenetv2_100_nam_ch`` is the old name of ``mobilenetv2_100_nam`` (deprecated).
* ``mobilenetv2_100_se`` / ``_cbam`` / ``_bam``: the paper's Table 2 baselines (SE and CBAM at the
  same block-end position, BAM after each of the 7 stages).
* ``efficientnet_b0_nam``: timm's EfficientNet-B0 (its own SE kept) plus channel NAM at every block end.
"""

from functools import partial
from typing import Optional, Tuple, Union

import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model, register_model_deprecations
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet

from ._attn import create_block_attn, create_stage_attn, feat_size_at, nam_options, norm_before_attn
from ._builder import build_nam_model, reparameterize_nam
from ._cfg import nam_cfg

__all__ = ['AttnEfficientNet']


def _projection_norm(block: nn.Module) -> nn.Module:
    if isinstance(block, InvertedResidual):
        return block.bn3
    if isinstance(block, DepthwiseSeparableConv):
        return block.bn2
    raise TypeError(f'No block-end attention slot known for {type(block).__name__}')


class AttnEfficientNet(EfficientNet):
    """timm's EfficientNet with a named attention at the end of every block and/or after stages.

    Args:
        block_attn: attention after every block's projection BN, a key of ``BLOCK_ATTN_KINDS`` or None.
        stage_attn: attention appended to every stage ('bam') or None.
        img_size: input size the spatial attention is built for.
        nam_weighting, nam_grad_through_weights: options of the NAM gates (see `AttnResNet`).
        Other args: timm's `EfficientNet`.
    """

    def __init__(
        self,
        *args,
        block_attn: Optional[str] = None,
        stage_attn: Optional[str] = None,
        img_size: Union[int, Tuple[int, int]] = 224,
        nam_weighting: str = 'sum',
        nam_grad_through_weights: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.img_size = to_2tuple(img_size)
        self.block_attn = block_attn
        self.stage_attn = stage_attn
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        nam = nam_options(nam_weighting, nam_grad_through_weights)
        if nam and block_attn is None:
            raise ValueError(f'NAM options {sorted(nam)} were given for a model without block attention')
        reduction = self.conv_stem.stride[0]
        for stage in self.blocks:
            for block in stage:
                reduction *= block.conv_dw.stride[0]
                if block_attn is not None:
                    norm = _projection_norm(block)
                    if not isinstance(norm.act, nn.Identity):
                        raise ValueError(f'{type(block).__name__} has an activation after its projection norm')
                    feat_size = feat_size_at(self.img_size, reduction)
                    norm.act = create_block_attn(block_attn, norm.num_features, feat_size=feat_size, nam=nam, **dd)
                    norm_before_attn(norm, norm.act)
            if stage_attn is not None:
                stage.append(create_stage_attn(stage_attn, _projection_norm(stage[-1]).num_features, **dd))

    def reparameterize(self) -> None:
        """Fold every NAM gate for inference, in place (`timm_nam.NAMChannel.fuse`); what
        `timm.utils.reparameterize_model` does to this model's children."""
        reparameterize_nam(self)


def _create_attn_effnet(variant: str, pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    # features_only goes through timm's generic FeatureListNet over the model's feature_info
    return build_nam_model(AttnEfficientNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


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
    return _create_attn_effnet(variant, pretrained, **model_kwargs)


def _gen_efficientnet_b0(variant: str, pretrained: bool = False, **kwargs):
    """timm's EfficientNet-B0 definition (``_gen_efficientnet``), built as an `AttnEfficientNet`."""
    arch_def = [
        ['ds_r1_k3_s1_e1_c16_se0.25'],
        ['ir_r2_k3_s2_e6_c24_se0.25'],
        ['ir_r2_k5_s2_e6_c40_se0.25'],
        ['ir_r3_k3_s2_e6_c80_se0.25'],
        ['ir_r3_k5_s1_e6_c112_se0.25'],
        ['ir_r4_k5_s2_e6_c192_se0.25'],
        ['ir_r1_k3_s1_e6_c320_se0.25'],
    ]
    round_chs_fn = partial(round_channels, multiplier=1.0, divisor=8)
    model_kwargs = dict(
        block_args=decode_arch_def(arch_def, 1.0),
        num_features=round_chs_fn(1280),
        stem_size=32,
        round_chs_fn=round_chs_fn,
        act_layer=resolve_act_layer(kwargs, 'swish'),
        norm_layer=kwargs.pop('norm_layer', None) or partial(nn.BatchNorm2d, **resolve_bn_args(kwargs)),
        **kwargs,
    )
    return _create_attn_effnet(variant, pretrained, **model_kwargs)


def _cfg(fixed: bool = False, **kwargs):
    return nam_cfg('conv_stem', 'classifier', fixed_input_size=fixed, interpolation='bicubic', **kwargs)


# A trained tag joins these cfgs when its weights are published (hub_configs/README.md). timm promotes the first
# tag with weights to an architecture's default unless a later '<arch>.*' key claims it: a published tag goes
# before an '<arch>.*' key so the untagged, ImageNet-shaped cfg stays the default.
default_cfgs = generate_default_cfgs(
    {
        'mobilenetv2_nam': _cfg(),
        'mobilenetv2_100_nam': _cfg(),
        'mobilenetv2_140_nam': _cfg(),
        'mobilenetv2_050_nam': _cfg(),
        'mobilenetv2_100_nam_chsp': _cfg(fixed=True),
        'mobilenetv2_140_nam_chsp': _cfg(fixed=True),
        'mobilenetv2_050_nam_chsp': _cfg(fixed=True),
        'mobilenetv2_100_se': _cfg(),
        'mobilenetv2_100_cbam': _cfg(),
        'mobilenetv2_100_bam': _cfg(),
        'efficientnet_b0_nam': _cfg(),
    }
)


@register_model
def mobilenetv2_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.0) + channel NAM at every block end (same as mobilenetv2_100_nam)."""
    return _gen_mobilenetv2('mobilenetv2_nam', 1.0, pretrained, block_attn='nam_ch', **kwargs)


@register_model
def mobilenetv2_100_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.0) + channel NAM at every block end (the paper's Table 2 parameter count)."""
    return _gen_mobilenetv2('mobilenetv2_100_nam', 1.0, pretrained, block_attn='nam_ch', **kwargs)


@register_model
def mobilenetv2_140_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.4) + channel NAM at every block end."""
    return _gen_mobilenetv2('mobilenetv2_140_nam', 1.4, pretrained, block_attn='nam_ch', **kwargs)


@register_model
def mobilenetv2_050_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 0.5) + channel NAM at every block end."""
    return _gen_mobilenetv2('mobilenetv2_050_nam', 0.5, pretrained, block_attn='nam_ch', **kwargs)


@register_model
def mobilenetv2_100_nam_chsp(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.0) + channel then spatial NAM at every block end (the paper's text); fixed input size."""
    return _gen_mobilenetv2('mobilenetv2_100_nam_chsp', 1.0, pretrained, block_attn='nam', **kwargs)


@register_model
def mobilenetv2_140_nam_chsp(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 1.4) + channel then spatial NAM at every block end; fixed input size."""
    return _gen_mobilenetv2('mobilenetv2_140_nam_chsp', 1.4, pretrained, block_attn='nam', **kwargs)


@register_model
def mobilenetv2_050_nam_chsp(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """MobileNetV2 (width 0.5) + channel then spatial NAM at every block end; fixed input size."""
    return _gen_mobilenetv2('mobilenetv2_050_nam_chsp', 0.5, pretrained, block_attn='nam', **kwargs)


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


@register_model
def efficientnet_b0_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """EfficientNet-B0 (with its SE) + channel NAM at every block end."""
    return _gen_efficientnet_b0('efficientnet_b0_nam', pretrained, block_attn='nam_ch', **kwargs)


register_model_deprecations(__name__, {'mobilenetv2_100_nam_ch': 'mobilenetv2_100_nam'})
