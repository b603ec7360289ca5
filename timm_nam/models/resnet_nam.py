"""ResNets with NAM (and the NAM paper's baselines) in every residual block.

NAM sits where timm puts block attention: after the last conv+BN of the residual branch, before
drop-path and the residual add (Bottleneck: after bn3; BasicBlock: after bn2), in every block.

* ImageNet layout: ``resnet{18,34,50,101}_nam`` (channel NAM, the paper's best ResNet setting),
  ``resnet18_nam_sp``/``resnet50_nam_sp`` (spatial only) and ``resnet50_nam_chsp`` (channel then spatial);
  ``resnet18_se``/``resnet18_cbam``: baselines with the paper's SE/CBAM settings; ``resnet18_simam``: SimAM, NAM's
  parameter-free peer; ``resnet18_half``: the branch times a constant 0.5, the control for NAM's near-constant gate.
* CIFAR layout for the paper's Table 1 (3x3 stride-1 stem, no max-pool, 32x32, 100 classes):
  ``resnet50_cifar`` and its ``_se``, ``_cbam``, ``_bam``, ``_tam``, ``_nam``, ``_nam_sp``,
  ``_nam_chsp`` variants.

Spatial (pixel) NAM has one scale per feature-map position, so models with it are built for one
input size (``img_size=``, default the cfg's) and their cfg says ``fixed_input_size=True``.
"""

from functools import partial
from typing import Optional, Tuple, Union

import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import ResNet, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck

from ._attn import BLOCK_ATTN_KINDS, create_block_attn, create_stage_attn, nam_options
from ._builder import build_nam_model, reparameterize_nam
from ._cfg import cifar_cfg, nam_cfg, plain_weights_cfgs
from ._placement import NAM_KINDS, insert_nam

__all__ = ['AttnResNet']


class AttnResNet(ResNet):
    """timm's ResNet with NAM or a named baseline attention in every block and/or after stages, optionally with a
    CIFAR stem. Everything else (blocks, init, features, heads, checkpointing) is timm's.

    Args:
        block_attn: attention in every block: a NAM kind ('nam', 'nam_sp', 'nam_chsp', placed after the block's last
            norm by `timm_nam.models._placement`), a baseline of ``BLOCK_ATTN_KINDS`` (timm's attention slot, the
            same position) or None.
        stage_attn: attention appended to stages ``stage_attn_stages`` ('bam') or None.
        stage_attn_stages: 0-based stage indices that get ``stage_attn`` (BAM: after layer1-3).
        cifar_stem: 3x3 stride-1 stem conv and no max-pool (the CIFAR ResNets of the paper).
        img_size: input size the spatial attention is built for.
        nam_weighting, nam_grad_through_weights: options of the NAM gates (`timm_nam.NAMChannel`'s ``weighting``
            and ``grad_through_weights``), e.g. ``--model-kwargs nam_weighting=mean`` in timm's train.py.
        Other args: timm's `ResNet`.
    """

    def __init__(
        self,
        block,
        layers: Tuple[int, ...],
        block_attn: Optional[str] = None,
        stage_attn: Optional[str] = None,
        stage_attn_stages: Tuple[int, ...] = (0, 1, 2),
        cifar_stem: bool = False,
        img_size: Union[int, Tuple[int, int]] = 224,
        output_stride: int = 32,
        nam_weighting: str = 'sum',
        nam_grad_through_weights: bool = False,
        **kwargs,
    ):
        if cifar_stem and output_stride != 32:
            raise ValueError(f'cifar_stem models support output_stride=32 only, got {output_stride}')
        nam = nam_options(block_attn, nam_weighting, nam_grad_through_weights)
        self.img_size = to_2tuple(img_size)
        self.block_attn = block_attn
        self.stage_attn = stage_attn
        if block_attn in BLOCK_ATTN_KINDS:
            expansion = block.expansion
            block = partial(block, attn_layer=partial(create_block_attn, block_attn))
            block.expansion = expansion  # timm's make_blocks reads it
        super().__init__(block, layers, output_stride=output_stride, **kwargs)
        dd = dict(device=kwargs.get('device'), dtype=kwargs.get('dtype'))
        if cifar_stem:
            stem_chs = self.conv1.out_channels
            in_chans = kwargs.get('in_chans', 3)
            self.conv1 = nn.Conv2d(in_chans, stem_chs, kernel_size=3, stride=1, padding=1, bias=False, **dd)
            nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')
            self.maxpool = nn.Identity()
            for info in self.feature_info:
                info['reduction'] = max(info['reduction'] // 4, 1)
        if block_attn in NAM_KINDS:
            insert_nam(self, block_attn, img_size=self.img_size, **nam)
        if stage_attn is not None:
            for i in stage_attn_stages:
                stage = getattr(self, f'layer{i + 1}')
                stage.append(create_stage_attn(stage_attn, self.feature_info[i + 1]['num_chs'], **dd))

    def reparameterize(self) -> None:
        """Fold every NAM gate for inference, in place (`timm_nam.NAMChannel.fuse`); what
        `timm.utils.reparameterize_model` does to this model's children."""
        reparameterize_nam(self)


def _create_attn_resnet(variant: str, pretrained: bool = False, **kwargs) -> AttnResNet:
    return build_nam_model(AttnResNet, variant, pretrained, **kwargs)


def _rn_cfg(fixed: bool = False, **kwargs):
    return nam_cfg('conv1', 'fc', fixed_input_size=fixed, **kwargs)


def _rn_cifar_cfg(fixed: bool = False, **kwargs):
    return cifar_cfg('conv1', 'fc', fixed_input_size=fixed, **kwargs)


# The untagged cfgs are the ImageNet-shaped architectures; each NAM model whose plain network has timm ImageNet weights
# also gets those weights, converted, as its default tag (plain_<tag>). A NAM-trained tag joins these cfgs when its
# weights are published (hub_configs/README.md).
_PLAIN_WEIGHTS = {
    'resnet18_nam': 'resnet18.a1_in1k',
    'resnet18_nam_sp': 'resnet18.a1_in1k',
    'resnet34_nam': 'resnet34.a1_in1k',
    'resnet50_nam': 'resnet50.a1_in1k',
    'resnet50_nam_sp': 'resnet50.a1_in1k',
    'resnet50_nam_chsp': 'resnet50.a1_in1k',
    'resnet101_nam': 'resnet101.a1h_in1k',
}
default_cfgs = generate_default_cfgs(
    plain_weights_cfgs(
        {
            'resnet18_nam': _rn_cfg(),
            'resnet18_nam_sp': _rn_cfg(fixed=True),
            'resnet18_se': _rn_cfg(),
            'resnet18_cbam': _rn_cfg(),
            'resnet18_simam': _rn_cfg(),
            'resnet18_half': _rn_cfg(),
            'resnet34_nam': _rn_cfg(),
            'resnet50_nam': _rn_cfg(),
            'resnet101_nam': _rn_cfg(),
            'resnet50_nam_sp': _rn_cfg(fixed=True),
            'resnet50_nam_chsp': _rn_cfg(fixed=True),
            'resnet50_cifar': _rn_cifar_cfg(),
            'resnet50_cifar_se': _rn_cifar_cfg(),
            'resnet50_cifar_cbam': _rn_cifar_cfg(),
            'resnet50_cifar_bam': _rn_cifar_cfg(),
            'resnet50_cifar_tam': _rn_cifar_cfg(),
            'resnet50_cifar_nam': _rn_cifar_cfg(),
            'resnet50_cifar_nam_sp': _rn_cifar_cfg(fixed=True),
            'resnet50_cifar_nam_chsp': _rn_cifar_cfg(fixed=True),
        },
        _PLAIN_WEIGHTS,
    )
)

_R18 = dict(block=BasicBlock, layers=(2, 2, 2, 2))
_R34 = dict(block=BasicBlock, layers=(3, 4, 6, 3))
_R50 = dict(block=Bottleneck, layers=(3, 4, 6, 3))
_R101 = dict(block=Bottleneck, layers=(3, 4, 23, 3))
# The authors' CIFAR ResNet (kuangliu-style) has no zero-init of the last BN.
_R50_CIFAR = dict(_R50, cifar_stem=True, img_size=32, zero_init_last=False)


def _create(variant: str, pretrained: bool, arch: dict, **kwargs) -> AttnResNet:
    return _create_attn_resnet(variant, pretrained, **dict(arch, **kwargs))


@register_model
def resnet18_nam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-18 with channel NAM after bn2 of every BasicBlock."""
    return _create('resnet18_nam', pretrained, dict(_R18, block_attn='nam'), **kwargs)


@register_model
def resnet18_nam_sp(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-18 with spatial (pixel) NAM after bn2 of every BasicBlock; built for one input size."""
    return _create('resnet18_nam_sp', pretrained, dict(_R18, block_attn='nam_sp'), **kwargs)


@register_model
def resnet18_se(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-18 + SE (r=16, bias-free) in every block: the NAM comparison's baseline, as in Table 1."""
    return _create('resnet18_se', pretrained, dict(_R18, block_attn='se'), **kwargs)


@register_model
def resnet18_cbam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-18 + CBAM (r=16, k=7) in every block: the NAM comparison's baseline, as in Table 1."""
    return _create('resnet18_cbam', pretrained, dict(_R18, block_attn='cbam'), **kwargs)


@register_model
def resnet18_simam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-18 + SimAM (parameter-free) after bn2 of every BasicBlock, where NAM sits: NAM's closest peer."""
    return _create('resnet18_simam', pretrained, dict(_R18, block_attn='simam'), **kwargs)


@register_model
def resnet18_half(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-18 whose residual branch is multiplied by 0.5 after bn2, where NAM sits (no parameters, no gate): the
    control for NAM, whose gates start at 0.5 and stay near it."""
    return _create('resnet18_half', pretrained, dict(_R18, block_attn='half'), **kwargs)


@register_model
def resnet34_nam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-34 with channel NAM after bn2 of every BasicBlock."""
    return _create('resnet34_nam', pretrained, dict(_R34, block_attn='nam'), **kwargs)


@register_model
def resnet50_nam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-50 with channel NAM after bn3 of every Bottleneck (the paper's best ResNet setting)."""
    return _create('resnet50_nam', pretrained, dict(_R50, block_attn='nam'), **kwargs)


@register_model
def resnet101_nam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-101 with channel NAM after bn3 of every Bottleneck."""
    return _create('resnet101_nam', pretrained, dict(_R101, block_attn='nam'), **kwargs)


@register_model
def resnet50_nam_sp(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-50 with spatial (pixel) NAM only in every block; built for one input size."""
    return _create('resnet50_nam_sp', pretrained, dict(_R50, block_attn='nam_sp'), **kwargs)


@register_model
def resnet50_nam_chsp(pretrained: bool = False, **kwargs) -> AttnResNet:
    """ResNet-50 with channel then spatial NAM in every block; built for one input size."""
    return _create('resnet50_nam_chsp', pretrained, dict(_R50, block_attn='nam_chsp'), **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 (paper Table 1 baseline)."""
    return _create('resnet50_cifar', pretrained, _R50_CIFAR, **kwargs)


@register_model
def resnet50_cifar_se(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + SE (r=16, bias-free) in every block (paper Table 1)."""
    return _create('resnet50_cifar_se', pretrained, dict(_R50_CIFAR, block_attn='se'), **kwargs)


@register_model
def resnet50_cifar_cbam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + CBAM (r=16, k=7) in every block (paper Table 1)."""
    return _create('resnet50_cifar_cbam', pretrained, dict(_R50_CIFAR, block_attn='cbam'), **kwargs)


@register_model
def resnet50_cifar_bam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + BAM after layer1, layer2 and layer3 (paper Table 1)."""
    return _create('resnet50_cifar_bam', pretrained, dict(_R50_CIFAR, stage_attn='bam'), **kwargs)


@register_model
def resnet50_cifar_tam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + triplet attention (k=7) in every block (paper Table 1)."""
    return _create('resnet50_cifar_tam', pretrained, dict(_R50_CIFAR, block_attn='tam'), **kwargs)


@register_model
def resnet50_cifar_nam(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + channel NAM in every block (paper Table 1, NAM(ch))."""
    return _create('resnet50_cifar_nam', pretrained, dict(_R50_CIFAR, block_attn='nam'), **kwargs)


@register_model
def resnet50_cifar_nam_sp(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + spatial NAM in every block (paper Table 1, NAM(sp)); 32x32 only."""
    return _create('resnet50_cifar_nam_sp', pretrained, dict(_R50_CIFAR, block_attn='nam_sp'), **kwargs)


@register_model
def resnet50_cifar_nam_chsp(pretrained: bool = False, **kwargs) -> AttnResNet:
    """CIFAR ResNet-50 + channel then spatial NAM in every block; 32x32 only."""
    return _create('resnet50_cifar_nam_chsp', pretrained, dict(_R50_CIFAR, block_attn='nam_chsp'), **kwargs)
