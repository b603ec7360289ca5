"""Pretrained-cfg fields shared by every timm-nam model, and the cfg of timm's plain weights converted to NAM."""

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['nam_cfg', 'cifar_cfg', 'plain_cfg', 'hub_id', 'HF_ORG', 'PLAIN_TAG_PREFIX']

# The one place that names the Hugging Face Hub organisation and repos: '<org>/<model>.<tag>', as timm does.
HF_ORG = 'timm-nam'
# A NAM model's tag for timm's plain weights '<arch>.<tag>' is 'plain_<tag>': plain weights converted, not NAM-trained.
PLAIN_TAG_PREFIX = 'plain_'
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
_PAPER = dict(
    paper_ids='arXiv:2111.12419',
    paper_name='NAM: Normalization-based Attention Module',
    origin_url='https://github.com/Christian-lyc/NAM',
    license='apache-2.0',
)
# what the plain weights' own cfg says about them, carried over to the NAM model's cfg
_PLAIN_FACTS = ('hf_hub_id', 'input_size', 'test_input_size', 'crop_pct', 'test_crop_pct', 'crop_mode')
_PLAIN_FACTS += ('interpolation', 'mean', 'std', 'license')


def hub_id(model_name: str, tag: str) -> str:
    return f'{HF_ORG}/{model_name}.{tag}'


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
        **_PAPER,
        **kwargs,
    }


def cifar_cfg(first_conv: str, classifier: str, **kwargs) -> dict:
    cifar = dict(input_size=(3, 32, 32), pool_size=(4, 4), crop_pct=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    return nam_cfg(first_conv, classifier, num_classes=100, **cifar, **kwargs)


def plain_cfg(source: str, base: dict) -> dict:
    """The cfg of timm's plain weights ``source`` (``'resnet50.a1_in1k'``) converted for a NAM model whose untagged cfg
    is ``base``: the model's ``plain_<tag>`` tag loads them through timm's own loader and converts them
    (`timm_nam.convert`). What the weights' own cfg says about them (hub id, input size, crop, normalization,
    license) is carried over; a model built for one input size (pixel attention) keeps no other test size."""
    from timm.models import get_pretrained_cfg

    plain = get_pretrained_cfg(source).to_dict()
    facts = {k: plain[k] for k in _PLAIN_FACTS if plain.get(k) is not None}
    if base.get('fixed_input_size'):
        facts = {k: v for k, v in facts.items() if k not in ('test_input_size', 'test_crop_pct')}
    notes = (
        f"timm's plain {source} ImageNet weights, not NAM-trained: converted when loaded so that the network computes "
        "what the plain one does up to the gates' small deviation from 0.5 (timm_nam.convert; measured in "
        'results/pretrained_conversion/)'
    )
    return {**base, **facts, 'notes': notes}
