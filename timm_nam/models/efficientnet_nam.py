"""EfficientNet-B0 with NAM at the end of every block, and `AttnEfficientNet`, the class of every EfficientNet-family
model here (the MobileNetV2 ones too: timm builds MobileNetV2 as an EfficientNet).

The paper puts NAM "at the end of each network block": after the projection (pointwise-linear) norm of each inverted
residual, before the shortcut add (`timm_nam.models._placement`). timm's ``se_layer`` slot sits elsewhere (after the
depthwise conv), so the baselines that the paper places at the same block end (SE, CBAM) go into the projection
norm's activation slot, an ``Identity`` in these architectures, which runs after the norm, before drop-path and the
shortcut.

* ``efficientnet_b0_nam``: timm's EfficientNet-B0 (its own SE kept) plus channel NAM at every block end.
* ``efficientnet_lite0_nam``: timm's EfficientNet-Lite0, built by timm, plus channel NAM at every block end.
"""

from functools import partial
from typing import Optional, Tuple, Union

import timm
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from timm.models._efficientnet_builder import decode_arch_def, resolve_act_layer, resolve_bn_args, round_channels
from timm.models.efficientnet import EfficientNet

from ._attn import BLOCK_ATTN_KINDS, create_block_attn, create_stage_attn, nam_options
from ._builder import build_nam_model, reparameterize_nam
from ._cfg import nam_cfg, plain_weights_cfgs
from ._placement import NAM_KINDS, insert_nam

__all__ = ['AttnEfficientNet', 'efficientnet_cfg', 'create_attn_efficientnet']


def _projection_norm(block: nn.Module) -> nn.Module:
    if isinstance(block, InvertedResidual):
        return block.bn3
    if isinstance(block, DepthwiseSeparableConv):
        return block.bn2
    raise TypeError(f'No block-end attention slot known for {type(block).__name__}')


class AttnEfficientNet(EfficientNet):
    """timm's EfficientNet with NAM or a named baseline attention at the end of every block and/or after stages.

    Args:
        block_attn: attention at every block end: a NAM kind ('nam', 'nam_sp', 'nam_chsp'), a baseline of
            ``BLOCK_ATTN_KINDS`` or None.
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
        nam = nam_options(block_attn, nam_weighting, nam_grad_through_weights)
        super().__init__(*args, **kwargs)
        self.img_size = to_2tuple(img_size)
        self.block_attn = block_attn
        self.stage_attn = stage_attn
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        if block_attn in NAM_KINDS:
            insert_nam(self, block_attn, img_size=self.img_size, blocks_without_skip=True, **nam)
        for stage in self.blocks:
            if block_attn in BLOCK_ATTN_KINDS:
                for block in stage:
                    norm = _projection_norm(block)
                    norm.act = create_block_attn(block_attn, norm.num_features, **dd)
            if stage_attn is not None:
                stage.append(create_stage_attn(stage_attn, _projection_norm(stage[-1]).num_features, **dd))

    def reparameterize(self) -> None:
        """Fold every NAM gate for inference, in place (`timm_nam.NAMChannel.fuse`); what
        `timm.utils.reparameterize_model` does to this model's children."""
        reparameterize_nam(self)


def create_attn_efficientnet(variant: str, pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    # features_only goes through timm's generic FeatureListNet over the model's feature_info
    return build_nam_model(AttnEfficientNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True), **kwargs)


def efficientnet_cfg(fixed: bool = False, **kwargs):
    return nam_cfg('conv_stem', 'classifier', fixed_input_size=fixed, interpolation='bicubic', **kwargs)


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
    return create_attn_efficientnet(variant, pretrained, **model_kwargs)


def _with_nam(plain: str, block_attn: str = 'nam', img_size=224, nam_weighting: str = 'sum', **kwargs) -> nn.Module:
    """timm's ``plain`` network, built by timm, with NAM at the end of every block, as the paper counts them."""
    nam = nam_options(block_attn, nam_weighting, kwargs.pop('nam_grad_through_weights', False))
    model = timm.create_model(plain, **kwargs)
    return insert_nam(model, block_attn, img_size=to_2tuple(img_size), blocks_without_skip=True, **nam)


# See resnet_nam.py: the plain network's timm weights, converted, are the default tag.
default_cfgs = generate_default_cfgs(
    plain_weights_cfgs(
        {'efficientnet_b0_nam': efficientnet_cfg(), 'efficientnet_lite0_nam': efficientnet_cfg()},
        {'efficientnet_b0_nam': 'efficientnet_b0.ra_in1k', 'efficientnet_lite0_nam': 'efficientnet_lite0.ra_in1k'},
    )
)


@register_model
def efficientnet_b0_nam(pretrained: bool = False, **kwargs) -> AttnEfficientNet:
    """EfficientNet-B0 (with its SE) + channel NAM at every block end."""
    return _gen_efficientnet_b0('efficientnet_b0_nam', pretrained, block_attn='nam', **kwargs)


@register_model
def efficientnet_lite0_nam(pretrained: bool = False, **kwargs) -> EfficientNet:
    """EfficientNet-Lite0 + channel NAM at every block end."""
    return build_nam_model(
        partial(_with_nam, 'efficientnet_lite0'),
        'efficientnet_lite0_nam',
        pretrained,
        feature_cfg=dict(flatten_sequential=True),
        **kwargs,
    )
