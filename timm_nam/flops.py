"""FLOP counting with torch's own ``torch.utils.flop_counter``, in the NAM paper's convention.

Why this counter: it ships with torch (maintained, no extra dependency), counts at the aten level
(so it sees every conv and matmul whatever module issued it) and takes custom formulas for other
ops. It reports FLOPs as 2 x multiply-adds; the paper, like most vision papers, reports
multiply-adds ("MACs") and calls them FLOPs.

Convention that reproduces the paper's Tables 1-2: the authors counted with ``thop`` (2020 release, as
their code at https://github.com/Christian-lyc/NAM does), which also charges eval-mode batch norm 2 ops per element. So

    paper FLOPs = conv + linear multiply-adds + 2 x (elements normalized by each batch norm)

where NAM's pixel normalization, whose eval-mode affine runs as one ``addcmul``, counts as a batch
norm too. Models are counted in eval mode on a batch of one.
"""

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ['count_flops']

_aten = torch.ops.aten
# batch norm reaches the dispatcher under different names depending on mode and backend
_NORM_OPS = (
    _aten.native_batch_norm,
    _aten._native_batch_norm_legit_no_training,
    _aten.cudnn_batch_norm,
    _aten.addcmul,  # NAMSpatial's eval-mode pixel normalization
)


def _two_per_element(*args, out_shape=None, **kwargs) -> int:
    # batch norm returns (out, mean, invstd), addcmul a single tensor: count the main output
    shape = out_shape if isinstance(out_shape[0], int) else out_shape[0]
    return 2 * math.prod(shape)


@dataclass(frozen=True)
class FlopCount:
    macs: int  # conv + linear multiply-adds
    norm_ops: int  # 2 per element of every batch norm

    @property
    def paper_flops(self) -> int:
        """The paper's (thop 0.0.31) convention."""
        return self.macs + self.norm_ops


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Tuple[int, int, int]) -> FlopCount:
    """Count one eval-mode forward of ``model`` on a (1, *input_size) input."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping={op: _two_per_element for op in _NORM_OPS})
    try:
        with counter:
            model(torch.zeros(1, *input_size))
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts().get('Global', {})
    norm_ops = sum(v for k, v in counts.items() if k in _NORM_OPS)
    macs = sum(v for k, v in counts.items() if k not in _NORM_OPS) // 2
    return FlopCount(macs=macs, norm_ops=norm_ops)
