from ._attn import BLOCK_ATTN_KINDS, STAGE_ATTN_KINDS, create_block_attn, create_stage_attn
from .efficientnet_nam import AttnEfficientNet
from .resnet_nam import AttnResNet
