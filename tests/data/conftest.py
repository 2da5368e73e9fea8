"""Fixtures for the data tests: small generated image sets."""
import os

import pytest
from PIL import Image

from fastprompt.data import make_shapes_dataset


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A generated 4-class shapes data set: 5 train and 2 test images per class."""
    root = tmp_path_factory.mktemp("data") / "shapes"
    make_shapes_dataset(root, num_classes=4, images_per_class=5, test_images_per_class=2, seed=3)
    return root


@pytest.fixture
def write_image():
    """``write_image(path, colour=..., size=...)``: a small solid PNG/JPEG, folders created."""
    def write(path, colour=(10, 200, 30), size=(8, 8)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", size, colour).save(path)
        return str(path)
    return write
