"""How every timm-nam model is built: timm's plain network, built by timm, with its attention placed, through timm's
``build_model_with_cfg`` (cfg, features, kwargs, pretrained weights converted by its ``pretrained_filter_fn``)."""

import math
from functools import partial
from typing import Callable, Optional, Sequence, Tuple

import timm
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from ._attn import BLOCK_KINDS, NAM_KINDS, create_attn, factory_kwargs, nam_options
from ._placement import insert_nam, nam_sites

__all__ = ['build_nam_model', 'build_with_weights', 'finish_nam_model']


def build_nam_model(
    variant: str, pretrained: bool, plain: str, model_args: dict, feature_cfg: Optional[dict] = None, **kwargs
) -> nn.Module:
    """The model ``variant``: timm's network ``plain`` with the attention ``model_args`` name (`_network`), built by
    timm's ``build_model_with_cfg``; the caller's ``kwargs`` take precedence over ``model_args``, as in timm's own
    entrypoints. Also takes ``img_size`` (spatial NAM is built for it; the cfg then states it; fixed-size models
    default to their cfg's) and ``nam_penalty`` (p of the paper's penalty, a float or 'paper', applied at every
    ``optimizer.step()`` by `timm_nam.penalty.enable_penalty`: ``--model-kwargs nam_penalty=1e-4`` in timm's
    train.py). Pretrained weights load through timm's loader, timm's plain weights converted by the
    ``pretrained_filter_fn`` (`timm_nam.convert`); an error while loading names the model, the tag and the source."""
    from ..convert import plain_to_nam_state_dict

    kwargs = dict(model_args, **kwargs)
    nam_penalty = kwargs.pop('nam_penalty', None)
    built = []  # whether the network exists: what fails after that is the loading
    network = partial(_network, plain, built)
    model = build_with_weights(network, variant, pretrained, plain_to_nam_state_dict, feature_cfg, built, **kwargs)
    return finish_nam_model(model, kwargs.get('img_size'), nam_penalty)


def build_with_weights(
    network: Callable,
    variant: str,
    pretrained: bool,
    convert: Callable,
    feature_cfg: dict,
    built: list,
    name: Optional[str] = None,
    **kwargs,
) -> nn.Module:
    """timm's ``build_model_with_cfg`` with ``convert`` as its ``pretrained_filter_fn``, for a cfg of ``variant``
    that must have weights if ``pretrained``: an error while loading (after ``network`` has appended the model it
    built to ``built``) names the model (``name``, default ``variant``), the tag and the source."""
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    name = name or variant
    if pretrained and not cfg.has_weights:
        tags = ', '.join(timm.list_pretrained(f'{variant}.*')) or 'no trained tags exist yet'
        raise ValueError(
            f'{name} has no pretrained weights for its default (ImageNet) configuration; tags: {tags}; or give a '
            "weights file (pretrained_cfg_overlay=dict(file=...), train.py's --pretrained-path)"
        )
    try:
        return build_model_with_cfg(
            network, variant, pretrained, pretrained_filter_fn=convert, feature_cfg=feature_cfg, **kwargs
        )
    except Exception as e:
        if not (pretrained and built):
            raise
        source = cfg.file or cfg.hf_hub_id or cfg.url or 'its pretrained cfg'  # in the order timm's loader tries them
        raise RuntimeError(
            f'Could not load pretrained weights for {name} ({cfg.tag or "default"} tag) from {source}: '
            f'{str(e) or type(e).__name__}'
        ) from e


def finish_nam_model(model: nn.Module, img_size, nam_penalty) -> nn.Module:
    """What every NAM model gets after timm built it: a cfg that states the ``img_size`` it was built for, and the
    paper's penalty with p ``nam_penalty`` at every optimizer step (None: none)."""
    if img_size is not None:
        _state_input_size(model, to_2tuple(img_size))
    if nam_penalty is not None:
        from ..penalty import enable_penalty

        enable_penalty(model, nam_penalty)
    return model


def _network(
    plain: str,
    built: list,
    block_attn: Optional[str] = None,
    stage_attn: Optional[str] = None,
    stages: Sequence[str] = (),
    adapt: Optional[Callable] = None,
    img_size=224,
    nam_weighting: str = 'sum',
    nam_grad_through_weights: bool = False,
    **kwargs,
) -> nn.Module:
    """timm's network ``plain`` (changed by the model file's ``adapt``, e.g. a CIFAR stem) with ``block_attn`` after
    the norm that ends every block — NAM in every block the paper counts, a baseline in that norm's activation slot —
    and ``stage_attn`` appended to the ``stages``."""
    options = nam_options(block_attn, nam_weighting, nam_grad_through_weights)
    model = timm.create_model(plain, **kwargs)
    vars(model).pop('_model_args', None)  # the plain network's build args: timm records the NAM model's own
    if adapt is not None:
        adapt(model)
    if block_attn in NAM_KINDS:
        insert_nam(model, block_attn, img_size=to_2tuple(img_size), blocks_without_skip=True, **options)
    elif block_attn in BLOCK_KINDS:  # after the norm NAM would gate, before the add (not timm's SE slot)
        for site in nam_sites(model, blocks_without_skip=True):
            norm = model.get_submodule(site)
            norm.act = create_attn(block_attn, norm.num_features, **factory_kwargs(norm))
    for path in stages if stage_attn else ():
        stage = model.get_submodule(path)
        norm = [m for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][-1]
        stage.append(create_attn(stage_attn, norm.num_features, **factory_kwargs(norm)))
    built.append(model)
    return model


def _state_input_size(model: nn.Module, img_size: Tuple[int, int]) -> None:
    """A model built for another ``img_size`` gets a cfg that says so (data configs read it)."""
    cfg = dict(model.pretrained_cfg)
    if tuple(cfg['input_size'][-2:]) == img_size:
        return
    cfg['input_size'] = (cfg['input_size'][0], *img_size)
    if cfg.get('pool_size'):  # stride-2 steps with 'same' padding: each maps h to ceil(h / 2)
        cfg['pool_size'] = tuple(math.ceil(s / model.feature_info[-1]['reduction']) for s in img_size)
    model.pretrained_cfg = model.default_cfg = cfg
