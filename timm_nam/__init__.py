"""timm-nam: NAM (Normalization-based Attention Module) for timm."""
from .layers import NAM, BAM, NAMChannel, NAMSpatial, TripletAttention, nam_weights
from .models import *

__version__ = '0.1.0'
