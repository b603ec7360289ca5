from .nam import NAM, NAMChannel, NAMSpatial, nam_weights
from .bam import BAM
from .triplet import TripletAttention
