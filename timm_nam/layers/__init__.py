from .bam import BAM
from .nam import NAM, NAMChannel, NAMGate, NAMSpatial, nam_weights
from .nam_freeze import freeze_batch_norm_2d, unfreeze_batch_norm_2d
from .nam_norm import BatchNorm2dForNAM, BatchNormAct2dForNAM
from .scale import ConstantScale
from .simam import SimAM
from .triplet import TripletAttention
