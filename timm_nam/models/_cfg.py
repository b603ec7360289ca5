"""Pretrained-cfg fields shared by every timm-nam model, and the cfgs of timm's plain weights converted to NAM."""

from typing import Dict, Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = [
    'nam_cfg',
    'cifar_cfg',
    'plain_weights_cfgs',
    'hub_id',
    'HF_ORG',
    'PLAIN_TAG_PREFIX',
    'CIFAR100_MEAN',
    'CIFAR100_STD',
]

# The one place that names the Hugging Face Hub organisation and repos: '<org>/<model>.<tag>', as timm does.
HF_ORG = 'timm-nam'


def hub_id(model_name: str, tag: str) -> str:
    return f'{HF_ORG}/{model_name}.{tag}'


CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

PAPER = dict(
    paper_ids='arXiv:2111.12419',
    paper_name='NAM: Normalization-based Attention Module',
    origin_url='https://github.com/Christian-lyc/NAM',
    license='apache-2.0',
)


def nam_cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    """An ImageNet-style cfg; CIFAR variants override size, classes and normalization."""
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': (7, 7),
        'crop_pct': 0.875,
        'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': first_conv,
        'classifier': classifier,
        'fixed_input_size': False,
        **PAPER,
        **kwargs,
    }


def cifar_cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    return nam_cfg(
        first_conv,
        classifier,
        num_classes=100,
        input_size=(3, 32, 32),
        pool_size=(4, 4),
        crop_pct=1.0,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
        **kwargs,
    )


# A NAM model's tag for timm's plain weights '<arch>.<tag>' is 'plain_<tag>': plain weights converted, not NAM-trained.
PLAIN_TAG_PREFIX = 'plain_'
# what the plain weights' own cfg says about them, carried over to the NAM model's cfg
_PLAIN_FACTS = (
    'hf_hub_id',
    'input_size',
    'test_input_size',
    'crop_pct',
    'test_crop_pct',
    'crop_mode',
    'interpolation',
    'mean',
    'std',
    'license',
)


def _plain_cfg(base: dict, plain: str) -> Optional[dict]:
    from timm.models import get_pretrained_cfg

    try:
        source = get_pretrained_cfg(plain)
    except RuntimeError:  # the installed timm does not have that tag
        return None
    if source is None or not source.hf_hub_id:
        return None
    facts = {k: getattr(source, k) for k in _PLAIN_FACTS if getattr(source, k, None) is not None}
    if base.get('fixed_input_size'):  # built for one size (pixel attention): no other test size
        facts.pop('test_input_size', None)
        facts.pop('test_crop_pct', None)
    notes = (
        f"timm's plain {plain} ImageNet weights, not NAM-trained: converted when loaded so that the network computes "
        "what the plain one does up to the gates' small deviation from 0.5 (timm_nam.convert; measured in "
        'results/pretrained_conversion/)'
    )
    return {**base, **facts, 'notes': notes}


def plain_weights_cfgs(cfgs: Dict[str, dict], plain_of: Dict[str, str]) -> Dict[str, dict]:
    """``cfgs`` (untagged NAM model cfgs), where a model's plain network has timm weights ``plain_of[model]``
    (``'resnet50.a1_in1k'``) replaced by a ``<model>.plain_<tag>`` cfg for them: the model's default, which loads those
    weights through timm's own loader and converts them. A tag exists only where the installed timm knows the weights;
    elsewhere the untagged cfg stays."""
    out = {}
    for model, cfg in cfgs.items():
        tagged = _plain_cfg(cfg, plain_of[model]) if model in plain_of else None
        if tagged is None:
            out[model] = cfg
        else:
            out[f'{model}.{PLAIN_TAG_PREFIX}{plain_of[model].partition(".")[2]}'] = tagged
    return out
