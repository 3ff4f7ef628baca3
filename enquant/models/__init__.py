"""Models: the CIFAR-style pre-activation ResNet member and the stacked En_n ensemble."""

from enquant.models.ensemble import count_params, EnResNet, ModelConfig
from enquant.models.resnet import add_noise, PreActBlock, ResNet, stages_for_depth
