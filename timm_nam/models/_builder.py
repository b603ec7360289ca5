""" What every timm-nam entrypoint does around timm's ``build_model_with_cfg``. """
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg

__all__ = ['build_nam_model']


def build_nam_model(model_cls, variant: str, pretrained: bool, **kwargs):
    """``build_model_with_cfg`` plus two timm-nam model kwargs:

    * ``img_size``: passed to the model (spatial NAM is built for it); the model's cfg then states it.
    * ``nam_penalty``: p of the paper's sparsity penalty (a float, or 'paper' for the family's value),
      applied at every ``optimizer.step()`` (see `timm_nam.penalty.enable_penalty`). This is how timm's
      train.py trains with the penalty: ``--model-kwargs nam_penalty=1e-4``.
    """
    nam_penalty = kwargs.pop('nam_penalty', None)
    model = build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    _sync_cfg_input_size(model, kwargs.get('img_size'))
    if nam_penalty is not None:
        from ..penalty import enable_penalty
        enable_penalty(model, nam_penalty)
    return model


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
        ph, pw = cfg['pool_size']
        cfg['pool_size'] = (max(round(ph * h / old_h), 1), max(round(pw * w / old_w), 1))
    model.pretrained_cfg = model.default_cfg = cfg
