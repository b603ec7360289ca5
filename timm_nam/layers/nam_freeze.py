"""timm's batch-norm freezing, extended to the NAM gates that sit in a norm's activation slot.

timm's ``freeze_batch_norm_2d`` converts every ``BatchNorm2d`` / ``BatchNormAct2d`` it reaches, but it does not look
inside the activation of a ``BatchNormAct2d`` it converts. In the MobileNetV2 / EfficientNet models the NAM gate is
that activation (``bn3.act``), so timm's function leaves the gate's own batch norm live. These versions run timm's and
then convert the norms of those gates as well. On models whose gates are ordinary children (the ResNets) they do what
timm's do. A frozen gate uses its norm's running statistics in training as in eval (`NAMChannel`).
"""

import torch.nn as nn
from timm.layers import freeze_batch_norm_2d as _timm_freeze
from timm.layers import unfreeze_batch_norm_2d as _timm_unfreeze

from .nam import NAMChannel, NAMSpatial
from .nam_norm import for_nam

__all__ = ['freeze_batch_norm_2d', 'unfreeze_batch_norm_2d']


def _convert_gate_norms(module: nn.Module, convert) -> None:
    for gate in module.modules():
        if isinstance(gate, (NAMChannel, NAMSpatial)):
            gate.bn = convert(gate.bn)


def freeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm's ``freeze_batch_norm_2d`` (same contract: converts in place and returns the module, or the converted
    module if ``module`` is itself a norm), including the batch norms of NAM gates in activation slots."""
    module = _timm_freeze(module)
    _convert_gate_norms(module, _timm_freeze)
    return module


def unfreeze_batch_norm_2d(module: nn.Module) -> nn.Module:
    """timm's ``unfreeze_batch_norm_2d``, including NAM gates in activation slots. A norm whose activation is a NAM
    gate becomes NAM-aware again (`timm_nam.layers.nam_norm`)."""
    module = _timm_unfreeze(module)
    _convert_gate_norms(module, _timm_unfreeze)
    for norm in module.modules():
        if isinstance(getattr(norm, 'act', None), (NAMChannel, NAMSpatial)):
            for_nam(norm)
    return module
