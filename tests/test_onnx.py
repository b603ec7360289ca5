"""Deployment export: the main models, as built and folded (`timm.utils.reparameterize_model`), exported with
``torch.onnx.export`` and run in onnxruntime give PyTorch's outputs."""

import pytest
import timm
import torch
from timm.utils import reparameterize_model

from tests.helpers import randomize_bn
from timm_nam import NAMChannel, NAMSpatial

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

# spatial NAM only runs at the size it was built for; the others are exported at a small size to keep this quick
MODELS = [('resnet50_nam', 64), ('mobilenetv2_nam', 64), ('resnet18_nam_sp', 224), ('efficientnet_b0_nam', 64)]


def _calibrate_batch_norms(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Running statistics of every batch norm set to one batch's, so that eval-mode activations keep their scale
    through the network (with fresh statistics they shrink to ~1e-7 in EfficientNet-B0's head)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = 1.0
    with torch.no_grad():
        model.train()(x)
    for m in norms:
        m.momentum = 0.1


@pytest.mark.slow
@pytest.mark.parametrize('folded', [False, True], ids=['as_built', 'folded'])
@pytest.mark.parametrize('name,size', MODELS)
def test_onnx_export_runs_in_onnxruntime_with_pytorchs_outputs(name, size, folded, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    for m in model.modules():  # trained-looking gates, so that a wrong fold or gate would show
        if isinstance(m, (NAMChannel, NAMSpatial)):
            randomize_bn(m.bn)
    x = torch.randn(2, 3, size, size)
    _calibrate_batch_norms(model, x)
    model.eval()
    if folded:
        model = reparameterize_model(model)
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / f'{name}.onnx'
    torch.onnx.export(model, (x,), str(path), input_names=['images'], output_names=['logits'], dynamo=True)
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (out,) = session.run(None, {'images': x.numpy()})
    scale = float(expected.abs().max())
    assert scale > 0.1  # the comparison is not between two near-zero outputs
    torch.testing.assert_close(torch.from_numpy(out), expected, atol=1e-4 * scale, rtol=0)
