"""What every timm-nam entrypoint does around timm's ``build_model_with_cfg``."""

import math
from typing import Tuple

from timm.layers import to_2tuple
from timm.models import build_model_with_cfg
from timm.models._builder import load_pretrained, resolve_pretrained_cfg

__all__ = ['build_nam_model', 'reparameterize_nam', 'feat_size_at']


def feat_size_at(img_size: Tuple[int, int], reduction: int) -> Tuple[int, int]:
    """Feature map size after ``log2(reduction)`` stride-2 convs/pools with 'same'-style padding (kernel k, padding
    k//2), each of which maps h to ceil(h / 2)."""
    h, w = img_size
    while reduction > 1:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        reduction //= 2
    return h, w


def _from_plain_weights(state_dict, model):
    """timm's ``pretrained_filter_fn``: plain weights converted for the NAM model, NAM weights unchanged."""
    from ..convert import plain_to_nam_state_dict

    return plain_to_nam_state_dict(state_dict, model)


def build_nam_model(model_cls, variant: str, pretrained: bool, **kwargs):
    """``build_model_with_cfg`` plus two timm-nam model kwargs:

    * ``img_size``: passed to the model (spatial NAM is built for it); the model's cfg then states it.
      Fixed-size models default to their pretrained cfg's input size, so a tag trained at 64 px builds at 64 px.
    * ``nam_penalty``: p of the paper's sparsity penalty (a float, or 'paper' for the paper's value for the network,
      `timm_nam.penalty.paper_penalty`; see `timm_nam.penalty.resolve_penalty`), applied at every
      ``optimizer.step()`` (`timm_nam.penalty.enable_penalty`).
      This is how timm's train.py trains with the penalty: ``--model-kwargs nam_penalty=1e-4``.

    Pretrained weights load through timm's loader; plain weights (the ``plain_*`` tags: timm's own ImageNet weights)
    are converted for NAM on the way (`timm_nam.convert`). An error while loading them says which weights; any other
    error (a bad kwarg) is raised as it is.
    """
    nam_penalty = kwargs.pop('nam_penalty', None)
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get('pretrained_cfg'),
        pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'),
    )
    if pretrained and not cfg.has_weights:
        from timm.models import list_pretrained

        tags = [n for n in list_pretrained(f'{variant}.*') if '.' in n]
        raise ValueError(
            f'{variant} has no pretrained weights for its default (ImageNet) configuration; '
            + (f'trained tags: {", ".join(tags)}' if tags else 'no trained tags exist yet')
        )
    if cfg.fixed_input_size and kwargs.get('img_size') is None:
        kwargs['img_size'] = tuple(cfg.input_size[-2:])
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=_from_plain_weights, **kwargs)
    except Exception as e:
        if not (pretrained and _raised_while_loading(e)):
            raise  # a bad kwarg is the caller's error, not the weights'
        source = cfg.file or cfg.hf_hub_id or cfg.url or 'its pretrained cfg'  # in the order timm's loader tries them
        raise RuntimeError(
            f'Could not load pretrained weights for {variant} ({cfg.tag or "default"} tag) from {source}: {e}'
        ) from e
    _sync_cfg_input_size(model, kwargs.get('img_size'))
    if nam_penalty is not None:
        from ..penalty import enable_penalty

        enable_penalty(model, nam_penalty)
    return model


def _raised_while_loading(error: BaseException) -> bool:
    """Whether ``error`` came out of timm's ``load_pretrained`` (fetching, reading or fitting the weights) rather than
    out of building the model."""
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is load_pretrained.__code__:
            return True
        tb = tb.tb_next
    return False


def _sync_cfg_input_size(model, img_size) -> None:
    """A model built for another ``img_size`` gets a cfg that says so (data config reads it)."""
    if img_size is None:
        return
    h, w = to_2tuple(img_size)
    cfg = dict(model.pretrained_cfg)
    old_h, old_w = cfg['input_size'][-2:]
    if (old_h, old_w) == (h, w):
        return
    cfg['input_size'] = (cfg['input_size'][0], h, w)
    if cfg.get('pool_size'):
        cfg['pool_size'] = feat_size_at((h, w), model.feature_info[-1]['reduction'])
    model.pretrained_cfg = model.default_cfg = cfg


def reparameterize_nam(model) -> None:
    """Fold the NAM gates of ``model`` for inference, in place, with timm's own walk (imported here, not at
    ``import timm``)."""
    from timm.utils import reparameterize_model

    reparameterize_model(model, inplace=True)
