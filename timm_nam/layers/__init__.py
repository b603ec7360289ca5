from . import nam as _nam
from .bam import BAM
from .nam import NAMChannel, NAMChannelSpatial, NAMGate, NAMSpatial, nam_weights
from .norm_nam import NormNAM, NormNAMMe, norm_nam
from .scale import ConstantScale
from .simam import SimAM
from .triplet import TripletAttention


def __getattr__(name):
    return getattr(_nam, name)  # the deprecated NAM (timm_nam.layers.nam says so)
