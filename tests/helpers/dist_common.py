"""The model, inputs and batches shared by the distributed tests and their torchrun scripts."""

import torch

N = 15
# Per rank, the sample numbers of each batch: disjoint, together 0..N-1, equal batch counts.
BATCHES = {0: [[0, 1, 2, 3], [4, 5], [6, 7, 8]], 1: [[9, 10], [11, 12, 13], [14]]}


def make_model():
    import timm
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=32).eval()


def make_inputs():
    return torch.randn(N, 3, 32, 32, generator=torch.Generator().manual_seed(1))
