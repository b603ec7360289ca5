from ._attn import BLOCK_ATTN_KINDS, STAGE_ATTN_KINDS, create_block_attn, create_stage_attn
from ._placement import NAM_KINDS, NAMPlacementError, insert_nam, nam_sites
from .efficientnet_nam import AttnEfficientNet
from .mobilenetv2_nam import *  # noqa: F403  registers the MobileNetV2 models
from .resnet_nam import AttnResNet
