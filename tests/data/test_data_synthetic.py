"""The synthetic shapes data set: layout, determinism, content, and reuse of an existing tree."""
import os

import numpy as np
import pytest
from PIL import Image

from fastprompt.data import load_image_folder, make_shapes_dataset
from fastprompt.data.synthetic import COLOURS, SHAPES


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, root)] = open(p, "rb").read()
    return out


def test_layout_names_and_counts(tmp_path):
    s = make_shapes_dataset(tmp_path / "s", num_classes=9, images_per_class=3,
                            test_images_per_class=2, size=48, seed=1)
    assert sorted(os.listdir(tmp_path / "s" / "train")) == sorted(
        c.replace(" ", "_") for c in s.classnames)
    assert len(set(s.classnames)) == 9
    for name in s.classnames:
        colour, shape = name.split(" ")
        assert colour in COLOURS and shape in SHAPES
    assert len(s.train) == 27 and len(s.test) == 18
    assert s == load_image_folder(tmp_path / "s")
    with Image.open(s.train[0][0]) as im:
        assert im.size == (48, 48) and im.mode == "RGB"


def test_deterministic_from_seed(tmp_path):
    kwargs = dict(num_classes=3, images_per_class=2, test_images_per_class=1)
    a = _files(make_shapes_dataset(tmp_path / "a", seed=7, **kwargs).root)
    b = _files(make_shapes_dataset(tmp_path / "b", seed=7, **kwargs).root)
    c = _files(make_shapes_dataset(tmp_path / "c", seed=8, **kwargs).root)
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_each_image_shows_its_class_colour(tmp_path):
    # Background pixels stay below 126 in every channel; every class colour has a channel
    # >= 205, so pixels near the class colour come from the shape only.
    s = make_shapes_dataset(tmp_path / "s", num_classes=7, images_per_class=4,
                            test_images_per_class=1, seed=11)
    for path, label in s.train + s.test:
        colour = s.classnames[label].split(" ")[0]
        pixels = np.asarray(Image.open(path), dtype=np.int32)
        near = {name: int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 30).sum())
                for name, rgb in COLOURS.items()}
        assert near[colour] >= 60, (path, near)
        assert max(v for k, v in near.items() if k != colour) < near[colour] / 4, (path, near)


def test_existing_root_is_reused_or_refused(tmp_path):
    root = tmp_path / "s"
    first = make_shapes_dataset(root, num_classes=2, images_per_class=1, seed=0)
    mtime = os.stat(first.train[0][0]).st_mtime_ns
    assert make_shapes_dataset(root, num_classes=2, images_per_class=1, seed=0) == first
    assert os.stat(first.train[0][0]).st_mtime_ns == mtime  # not rewritten
    with pytest.raises(ValueError, match="^root: .* not a shapes data set made with these"):
        make_shapes_dataset(root, num_classes=2, images_per_class=1, seed=1)
    (tmp_path / "empty").mkdir()
    made = make_shapes_dataset(tmp_path / "empty", num_classes=2, images_per_class=1)
    assert len(made.train) == 2
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temp folders left
    with pytest.raises(ValueError, match="^num_classes: at most 42"):
        make_shapes_dataset(tmp_path / "x", num_classes=43)
