"""``nam``: any timm network with NAM, by name, for everything that builds models by name (timm's ``train.py``,
``validate.py``, ``benchmark.py``, ``onnx_export.py``, a Hub repo's config.json)::

    timm.create_model('nam', base='regnety_032', pretrained=True, num_classes=10)
    python train.py --model nam --model-kwargs base=regnety_032 nam_penalty=paper --pretrained ...

is timm's ``base`` network, built by timm, with NAM placed by `timm_nam.add_nam`'s rules and the base's own pretrained
cfg: its plain weights (or ``pretrained_cfg_overlay`` / train.py's ``--pretrained-path``) load through timm's loader
and are converted on the way, its data config is the base's. Weights of the NAM network itself (an export, a
checkpoint) load unchanged.
"""

from functools import partial
from typing import Optional

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model, split_model_name_tag

from ._attn import nam_options
from ._builder import build_with_weights, finish_nam_model
from ._cfg import nam_cfg
from ._placement import insert_nam

__all__ = []

DEFAULT_BASE = 'resnet50'
# the registry's entry, for tools that read a model's cfg by name; a built model carries its base's cfg
default_cfgs = generate_default_cfgs({'nam': nam_cfg('conv1', 'fc')})


@register_model
def nam(
    pretrained: bool = False,
    base: str = DEFAULT_BASE,
    kind: str = 'nam',
    img_size=None,
    blocks_without_skip: bool = False,
    weighting: str = 'sum',
    grad_through_weights: bool = False,
    scale_init: Optional[float] = None,
    max_slope: Optional[float] = None,
    nam_penalty=None,
    pretrained_cfg=None,
    pretrained_cfg_overlay=None,
    **kwargs,
) -> nn.Module:
    """timm's network ``base`` (a model name, optionally with a pretrained tag: ``'resnet50.tv2_in1k'``) with NAM.

    Args:
        base: the timm network to put NAM into (default: ResNet-50, so that the name alone builds a model).
        kind, img_size, blocks_without_skip, weighting, grad_through_weights, scale_init, max_slope: as
            `timm_nam.add_nam`'s.
        nam_penalty: p of the paper's penalty (a float, or 'paper'), applied at every ``optimizer.step()``.
        **kwargs: the base network's own (``num_classes``, ``drop_rate``, ...).
    """
    from ..convert import GATE_SLOPE, SCALE_INIT, plain_to_nam_state_dict

    architecture, tag = split_model_name_tag(str(base))
    if not timm.is_model(architecture) or architecture == 'nam':
        raise ValueError(
            f"The model 'nam' is a timm network with NAM, named by base= (create_model('nam', base='resnet50'), "
            f'train.py --model-kwargs base=resnet50); base={base!r} is not a timm model'
        )
    options = nam_options(kind, weighting, grad_through_weights)
    if img_size is not None and timm.get_pretrained_cfg_value(architecture, 'fixed_input_size'):
        kwargs['img_size'] = img_size  # a base built for one input size takes it too
    built = []
    network = partial(_network, architecture, kind, img_size, blocks_without_skip, options, built)
    convert = partial(
        plain_to_nam_state_dict,
        scale_init=SCALE_INIT if scale_init is None else scale_init,
        max_slope=GATE_SLOPE if max_slope is None else max_slope,
    )
    model = build_with_weights(
        network,
        architecture,
        pretrained,
        convert,
        dict(feature_cls='getter'),  # the base's forward_intermediates: any timm CNN's features
        built,
        name=f"the model 'nam' with base {base}",
        pretrained_cfg=pretrained_cfg or tag or None,
        pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {}, architecture='nam'),
        **kwargs,
    )
    return finish_nam_model(model, img_size, nam_penalty)


def _network(
    architecture: str, kind: str, nam_img_size, blocks_without_skip: bool, options: dict, built: list, **kwargs
):
    """The base network with NAM; ``kwargs`` are the base's (``img_size`` among them where its cfg fixes it)."""
    model = timm.create_model(architecture, **kwargs)
    vars(model).pop('_model_args', None)  # the base's build args: timm records the NAM model's own
    size = nam_img_size if nam_img_size is not None else kwargs.get('img_size')
    built.append(insert_nam(model, kind, img_size=size, blocks_without_skip=blocks_without_skip, **options))
    return model
