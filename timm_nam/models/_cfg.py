"""Pretrained-cfg fields shared by every timm-nam model."""

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ['nam_cfg', 'cifar_cfg', 'hub_id', 'HF_ORG', 'CIFAR100_MEAN', 'CIFAR100_STD']

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
