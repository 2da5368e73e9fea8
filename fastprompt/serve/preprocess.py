"""open_clip's evaluation transform rebuilt with Pillow and numpy: ``ImagePreprocessor``."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from fastprompt.serve.images import open_image
from fastprompt.serve.metadata import ModelInfo
from fastprompt.serve.session import available_cpus


class ImagePreprocessor:
    """open_clip's evaluation transform, rebuilt with Pillow and numpy from a model's metadata.

    Training reads every image as RGB and applies open_clip's ``preprocess_val``; this does the
    same steps with the same arithmetic: convert to RGB, resize with the model's interpolation
    (``shortest``: the short side to the crop size, the long side truncated as torchvision does;
    ``squash``: to the crop size; ``longest``: the long side to the crop size, rounded), centre
    crop (padding with ``fill_color`` where the image is smaller), then ``(x / 255 - mean) / std``
    in float32. Images are decoded and resized in a thread pool (Pillow releases the GIL there)
    and normalised as one batch array.
    """

    def __init__(self, info: ModelInfo, *, threads: int | None = None):
        if info.input_kind != "image" or info.image_size is None:
            raise ValueError("model: a head-only model takes image features, not images")
        self.size = tuple(info.image_size)  # (height, width)
        self.resize_mode = info.resize_mode or "shortest"
        if self.resize_mode not in ("shortest", "squash", "longest"):
            raise ValueError(f"model: unknown resize_mode {self.resize_mode!r} in its metadata")
        self.fill = int(info.fill_color or 0)
        # open_clip: bilinear when asked, bicubic otherwise; its non-square 'shortest' resize
        # (ResizeKeepRatio) always uses bicubic.
        bilinear = info.interpolation == "bilinear"
        if self.resize_mode == "shortest" and self.size[0] != self.size[1]:
            bilinear = False
        self.resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC
        self.mean = np.asarray(info.mean, np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(info.std, np.float32).reshape(1, 3, 1, 1)
        self.threads = available_cpus() if threads is None else max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after the resize step."""
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            return target_w, target_h
        if self.resize_mode == "shortest" and target_h == target_w:
            # torchvision's Resize(int): the short side to the size, the long one truncated.
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = target_h, int(target_h * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        # open_clip's ResizeKeepRatio: one ratio for both sides, each size rounded.
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(width / ratio), round(height / ratio)

    def pixels(self, image) -> np.ndarray:
        """One image (a PIL image) as the cropped H x W x 3 uint8 array."""
        image = image if image.mode == "RGB" else image.convert("RGB")
        size = self._resized_size(*image.size)
        if size != image.size:
            image = image.resize(size, self.resample)
        array = np.asarray(image)
        target_h, target_w = self.size
        height, width = array.shape[:2]
        if target_h > height or target_w > width:
            # Pad first (left/top get the smaller half), as torchvision's centre crop does.
            pad_h, pad_w = max(0, target_h - height), max(0, target_w - width)
            fill = self.fill if self.resize_mode == "longest" else 0
            array = np.pad(array, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2),
                                   (0, 0)), constant_values=fill)
            height, width = array.shape[:2]
        top = int(round((height - target_h) / 2.0))
        left = int(round((width - target_w) / 2.0))
        return array[top:top + target_h, left:left + target_w]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """N x H x W x 3 uint8 -> N x 3 x H x W float32, ``(x / 255 - mean) / std``."""
        x = pixels.transpose(0, 3, 1, 2).astype(np.float32)
        x /= np.float32(255)
        x -= self.mean
        x /= self.std
        return x

    def load(self, item, index: int = 0) -> np.ndarray:
        """Decode (a path) and crop one image: H x W x 3 uint8."""
        return self.pixels(open_image(item, index))

    def __call__(self, items: Sequence) -> np.ndarray:
        """Paths or PIL images -> the model's input, N x 3 x H x W float32."""
        return self.normalize(np.stack(self.map_load(items, start=0)))

    def map_load(self, items: Sequence, start: int = 0) -> list[np.ndarray]:
        """``load`` over ``items`` in the thread pool (``start``: index of the first, for errors)."""
        if len(items) == 1 or self.threads == 1:
            return [self.load(item, start + i) for i, item in enumerate(items)]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fastprompt-decode")
        return list(self._pool.map(self.load, items, range(start, start + len(items))))
