"""ResNets with NAM (and the NAM paper's baselines) in every residual block: timm's ResNet, built by timm.

NAM sits after the last conv+BN of the residual branch, before drop-path and the residual add (Bottleneck: after
bn3; BasicBlock: after bn2); the baselines take timm's attention slot, the same place. The ImageNet layout
(``resnet{18,34,50,101}_nam``, spatial ``_sp``, channel-then-spatial ``_chsp``, baselines and controls) and the CIFAR
layout of the paper's Table 1 (3x3 stride-1 stem, no max-pool, 32x32, 100 classes). Pixel attention has one scale
per feature-map position, so models with it are built for one input size (``img_size=``, ``fixed_input_size``).
"""

from functools import partial

import torch.nn as nn
from timm.models import ResNet, generate_default_cfgs, register_model

from ._attn import create_attn, factory_kwargs
from ._builder import build_nam_model
from ._cfg import cifar_cfg, nam_cfg, plain_cfg

__all__ = []


_cfg, _cifar = partial(nam_cfg, 'conv1', 'fc'), partial(cifar_cfg, 'conv1', 'fc')
# Each NAM model whose plain network has timm ImageNet weights has those weights, converted, as its default tag
# (plain_<tag>); a NAM-trained tag joins these cfgs when its weights are published (hub_configs/README.md).
default_cfgs = generate_default_cfgs(
    {
        'resnet18_nam.plain_a1_in1k': plain_cfg('resnet18.a1_in1k', _cfg()),
        'resnet18_nam_sp.plain_a1_in1k': plain_cfg('resnet18.a1_in1k', _cfg(fixed_input_size=True)),
        'resnet34_nam.plain_a1_in1k': plain_cfg('resnet34.a1_in1k', _cfg()),
        'resnet50_nam.plain_a1_in1k': plain_cfg('resnet50.a1_in1k', _cfg()),
        'resnet50_nam_sp.plain_a1_in1k': plain_cfg('resnet50.a1_in1k', _cfg(fixed_input_size=True)),
        'resnet50_nam_chsp.plain_a1_in1k': plain_cfg('resnet50.a1_in1k', _cfg(fixed_input_size=True)),
        'resnet101_nam.plain_a1h_in1k': plain_cfg('resnet101.a1h_in1k', _cfg()),
        'resnet18_se': _cfg(),
        'resnet18_cbam': _cfg(),
        'resnet18_simam': _cfg(),
        'resnet18_half': _cfg(),
        'resnet50_cifar': _cifar(),
        'resnet50_cifar_se': _cifar(),
        'resnet50_cifar_cbam': _cifar(),
        'resnet50_cifar_bam': _cifar(),
        'resnet50_cifar_tam': _cifar(),
        'resnet50_cifar_nam': _cifar(),
        'resnet50_cifar_nam_sp': _cifar(fixed_input_size=True),
        'resnet50_cifar_nam_chsp': _cifar(fixed_input_size=True),
    }
)


def _cifar_stem(model: ResNet) -> None:
    """The paper's CIFAR ResNet (kuangliu-style): a 3x3 stride-1 stem conv and no max-pool."""
    conv = model.conv1
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1, bias=False, **factory_kwargs(conv))
    nn.init.kaiming_normal_(model.conv1.weight, mode='fan_out', nonlinearity='relu')
    model.maxpool = nn.Identity()
    for info in model.feature_info:
        info['reduction'] = max(info['reduction'] // 4, 1)


def _slot(kind: str) -> dict:
    """timm's block attention slot, after the block's last norm, holding a baseline."""
    return dict(block_args=dict(attn_layer=partial(create_attn, kind)))


# the authors' CIFAR ResNet has no zero-init of the last BN; BAM goes after layer1-3 (Table 1)
_CIFAR = dict(adapt=_cifar_stem, zero_init_last=False, stages=('layer1', 'layer2', 'layer3'))


@register_model
def resnet18_nam(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with channel NAM after bn2 of every BasicBlock."""
    return build_nam_model('resnet18_nam', pretrained, 'resnet18', dict(block_attn='nam'), **kwargs)


@register_model
def resnet18_nam_sp(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with spatial (pixel) NAM after bn2 of every BasicBlock; built for one input size."""
    return build_nam_model('resnet18_nam_sp', pretrained, 'resnet18', dict(block_attn='nam_sp'), **kwargs)


@register_model
def resnet18_se(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 + SE (r=16, bias-free) in every block: the NAM comparison's baseline, as in Table 1."""
    return build_nam_model('resnet18_se', pretrained, 'resnet18', _slot('se'), **kwargs)


@register_model
def resnet18_cbam(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 + CBAM (r=16, k=7) in every block: the NAM comparison's baseline, as in Table 1."""
    return build_nam_model('resnet18_cbam', pretrained, 'resnet18', _slot('cbam'), **kwargs)


@register_model
def resnet18_simam(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 + SimAM (parameter-free) after bn2 of every BasicBlock, where NAM sits: NAM's closest peer."""
    return build_nam_model('resnet18_simam', pretrained, 'resnet18', _slot('simam'), **kwargs)


@register_model
def resnet18_half(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 whose residual branch is multiplied by 0.5 after bn2, where NAM sits (no parameters, no gate): the
    control for NAM, whose gates start at 0.5 and stay near it."""
    return build_nam_model('resnet18_half', pretrained, 'resnet18', _slot('half'), **kwargs)


@register_model
def resnet34_nam(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-34 with channel NAM after bn2 of every BasicBlock."""
    return build_nam_model('resnet34_nam', pretrained, 'resnet34', dict(block_attn='nam'), **kwargs)


@register_model
def resnet50_nam(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with channel NAM after bn3 of every Bottleneck (the paper's best ResNet setting)."""
    return build_nam_model('resnet50_nam', pretrained, 'resnet50', dict(block_attn='nam'), **kwargs)


@register_model
def resnet101_nam(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-101 with channel NAM after bn3 of every Bottleneck."""
    return build_nam_model('resnet101_nam', pretrained, 'resnet101', dict(block_attn='nam'), **kwargs)


@register_model
def resnet50_nam_sp(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with spatial (pixel) NAM only in every block; built for one input size."""
    return build_nam_model('resnet50_nam_sp', pretrained, 'resnet50', dict(block_attn='nam_sp'), **kwargs)


@register_model
def resnet50_nam_chsp(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with channel then spatial NAM in every block; built for one input size."""
    return build_nam_model('resnet50_nam_chsp', pretrained, 'resnet50', dict(block_attn='nam_chsp'), **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 (paper Table 1 baseline)."""
    return build_nam_model('resnet50_cifar', pretrained, 'resnet50', _CIFAR, **kwargs)


@register_model
def resnet50_cifar_se(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + SE (r=16, bias-free) in every block (paper Table 1)."""
    return build_nam_model('resnet50_cifar_se', pretrained, 'resnet50', dict(**_slot('se'), **_CIFAR), **kwargs)


@register_model
def resnet50_cifar_cbam(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + CBAM (r=16, k=7) in every block (paper Table 1)."""
    return build_nam_model('resnet50_cifar_cbam', pretrained, 'resnet50', dict(**_slot('cbam'), **_CIFAR), **kwargs)


@register_model
def resnet50_cifar_bam(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + BAM after layer1, layer2 and layer3 (paper Table 1)."""
    return build_nam_model('resnet50_cifar_bam', pretrained, 'resnet50', dict(**_CIFAR, stage_attn='bam'), **kwargs)


@register_model
def resnet50_cifar_tam(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + triplet attention (k=7) in every block (paper Table 1)."""
    return build_nam_model('resnet50_cifar_tam', pretrained, 'resnet50', dict(**_slot('tam'), **_CIFAR), **kwargs)


@register_model
def resnet50_cifar_nam(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + channel NAM in every block (paper Table 1, NAM(ch))."""
    return build_nam_model('resnet50_cifar_nam', pretrained, 'resnet50', dict(block_attn='nam', **_CIFAR), **kwargs)


@register_model
def resnet50_cifar_nam_sp(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + spatial NAM in every block (paper Table 1, NAM(sp)); 32x32 only."""
    return build_nam_model(
        'resnet50_cifar_nam_sp', pretrained, 'resnet50', dict(block_attn='nam_sp', **_CIFAR), **kwargs
    )


@register_model
def resnet50_cifar_nam_chsp(pretrained: bool = False, **kwargs) -> ResNet:
    """CIFAR ResNet-50 + channel then spatial NAM in every block; 32x32 only."""
    return build_nam_model(
        'resnet50_cifar_nam_chsp', pretrained, 'resnet50', dict(block_attn='nam_chsp', **_CIFAR), **kwargs
    )
