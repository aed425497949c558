"""The torch reference for pointwise (1x1) conv: what backend "torch" runs."""
import torch.nn.functional as F


def pointwise_conv2d(input, weight, bias=None):
    return F.conv2d(input, weight, bias)
