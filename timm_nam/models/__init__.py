from .resnet_nam import AttnResNet
