"""A synthetic image data set of coloured shapes, for the demo and the tests (no downloads)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from fastprompt._io import dumps_json
from fastprompt._checks import check_int, check_seed
from fastprompt.data.folders import DatasetSplits, load_image_folder

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225), "yellow": (230, 210, 40),
    "magenta": (205, 50, 205), "cyan": (40, 205, 215), "white": (245, 245, 245),
}
# 6 shapes and 7 colours are coprime, so class i = (colour i mod 7, shape i mod 6) gives 42
# distinct combinations, and the first few classes already differ in both colour and shape.
MAX_CLASSES = len(SHAPES) * len(COLOURS)
_MARKER = "fastprompt_shapes.json"


def _shape_classnames(num_classes: int) -> list[str]:
    """Class names in generation order: ``["red circle", "green square", ...]``."""
    colours = list(COLOURS)
    return [f"{colours[i % len(colours)]} {SHAPES[i % len(SHAPES)]}" for i in range(num_classes)]


def _draw_image(rng: np.random.Generator, shape: str, colour: tuple[int, int, int],
                size: int) -> Image.Image:
    base = rng.integers(20, 100)
    noise = rng.integers(-25, 26, size=(size, size, 3))
    img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    r = float(rng.uniform(0.18, 0.36)) * size
    cx, cy = (float(v) for v in rng.uniform(r, size - r, size=2))
    fill = tuple(int(c) for c in np.clip(np.array(colour) + rng.integers(-20, 21, size=3), 0, 255))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.8 * r, cy - 0.8 * r, cx + 0.8 * r, cy + 0.8 * r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = 0.3 * r
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:  # ring
        draw.ellipse(box, outline=fill, width=max(2, round(0.3 * r)))
    return img


def make_shapes_dataset(root, num_classes: int = 6, images_per_class: int = 16, *,
                        test_images_per_class: int | None = None, size: int = 64,
                        seed: int = 0) -> DatasetSplits:
    """Write PNG images of coloured shapes in the class-folder layout and return its splits.

    Class ``i`` is a colour and a shape ("red circle", "green square", ..., at most 42); each
    image has a random position, size and shade on a noisy dark background. Files go to
    ``root/{train,test}/<colour>_<shape>/<colour>_<shape>_<NNNN>.png``: ``images_per_class``
    training and ``test_images_per_class`` (default: the same number) test images per class.
    The images are a deterministic function of the arguments.

    The tree is written to a temporary sibling folder and renamed into place, so ``root`` is
    either complete or absent. If ``root`` already holds a data set made with the same
    arguments it is reused; any other non-empty ``root`` is refused.
    """
    for name, value, low in (("num_classes", num_classes, 2),
                             ("images_per_class", images_per_class, 1), ("size", size, 16)):
        check_int(name, value, low)
    if num_classes > MAX_CLASSES:
        raise ValueError(f"num_classes: at most {MAX_CLASSES} shape/colour classes, got "
                         f"{num_classes}")
    if test_images_per_class is None:
        test_images_per_class = images_per_class
    check_int("test_images_per_class", test_images_per_class, 1)
    check_seed(seed)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a path, got {type(root).__name__}")
    root = os.path.abspath(os.fspath(root))
    params = {"generator": "fastprompt.shapes/1", "num_classes": num_classes,
              "images_per_class": images_per_class,
              "test_images_per_class": test_images_per_class, "size": size, "seed": seed}
    if os.path.isdir(root) and os.listdir(root):
        try:
            with open(os.path.join(root, _MARKER), encoding="utf-8") as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError):
            existing = None
        if existing != params:
            raise ValueError(f"root: {root!r} exists and is not a shapes data set made with "
                             "these arguments; choose an empty or new folder")
        return load_image_folder(root, check_images=False)

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
    try:
        rng = np.random.default_rng(seed)
        colours = list(COLOURS)
        for i, classname in enumerate(_shape_classnames(num_classes)):
            folder = classname.replace(" ", "_")
            colour, shape = COLOURS[colours[i % len(colours)]], SHAPES[i % len(SHAPES)]
            for split, count in (("train", images_per_class), ("test", test_images_per_class)):
                out = os.path.join(tmp, split, folder)
                os.makedirs(out)
                for k in range(count):
                    _draw_image(rng, shape, colour, size).save(
                        os.path.join(out, f"{folder}_{k:04d}.png"))
        with open(os.path.join(tmp, _MARKER), "w", encoding="utf-8") as f:
            f.write(dumps_json(params, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        os.replace(tmp, root)  # an empty ``root`` directory is replaced too (POSIX rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_image_folder(root, check_images=False)
