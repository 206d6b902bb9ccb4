"""Shared fixtures: tiny data in the real on-disk formats the code reads."""
from pathlib import Path

import numpy as np
import pytest
import torch

# CI and the dev machines have 2 cores; more threads only add contention.
torch.set_num_threads(2)


def write_image_folder(root: Path, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                       size: int = 32, seed: int = 0) -> Path:
    """Write a DeiT-style ImageFolder (root/train/<class>/*.png, root/val/<class>/*.png) of random RGB images.

    Each class has its own mean colour so a model can learn something from it.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c in range(num_classes):
            d = root / split / f"class_{c}"
            d.mkdir(parents=True, exist_ok=True)
            base = rng.integers(0, 256, size=3)
            for i in range(n):
                noise = rng.integers(-40, 41, size=(size, size, 3))
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """A 3-class ImageFolder root with train/ and val/, 8 + 4 RGB 32x32 PNGs per class."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))
