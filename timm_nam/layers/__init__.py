from .bam import BAM
from .nam import NAM, NAMChannel, NAMGate, NAMSpatial, nam_weights
from .norm_nam import NormNAM, NormNAMMe, norm_nam
from .scale import ConstantScale
from .simam import SimAM
from .triplet import TripletAttention
