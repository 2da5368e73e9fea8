"""Fixtures for the data tests: small generated image sets."""
import os

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def shapes_root(shapes_data):
    """A generated 4-class shapes data set: 5 train and 2 test images per class (the default
    data set of ``shapes_data`` and ``cached_shapes``; shared, not to be changed)."""
    return shapes_data(4, images_per_class=5, test_images_per_class=2, data_seed=3)[0]


@pytest.fixture
def write_image():
    """``write_image(path, colour=..., size=...)``: a small solid PNG/JPEG, folders created."""
    def write(path, colour=(10, 200, 30), size=(8, 8)):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", size, colour).save(path)
        return str(path)
    return write
