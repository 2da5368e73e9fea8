"""fastprompt.serve's Pillow + numpy preprocessing against open_clip's evaluation transform (what
training applies to every image, read as RGB): bit-identical on generated images of odd sizes, both
orientations, every resize mode, both interpolations and RGB/RGBA/L/P modes; batches and threads
change nothing."""
from __future__ import annotations

import numpy as np
import pytest
from open_clip.transform import PreprocessCfg, image_transform_v2

from fastprompt.serve import ImagePreprocessor
from fastprompt.serve.metadata import ModelInfo
from onnxlib import random_image

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# (width, height): portrait, landscape, square, extreme strips, smaller than the crop, one off.
SIZES = [(31, 97), (97, 31), (64, 64), (300, 17), (17, 300), (5, 5), (65, 64), (225, 401)]
MODES = ("RGB", "RGBA", "L", "P")


def model_info(size, interpolation, resize_mode, fill_color=0) -> ModelInfo:
    return ModelInfo(class_names=["a", "b"], scale=1.0, input_kind="image", embed_dim=4,
                     model_name="m", image_size=size, mean=MEAN, std=STD,
                     interpolation=interpolation, resize_mode=resize_mode, fill_color=fill_color)


@pytest.mark.parametrize("size, interpolation, resize_mode", [
    ((64, 64), "bicubic", "shortest"),     # fastprompt-tiny
    ((224, 224), "bicubic", "shortest"),   # ViT-B-32 and most open_clip models
    ((224, 224), "bilinear", "shortest"),
    ((48, 80), "bicubic", "shortest"),     # non-square crop: open_clip's ResizeKeepRatio path
    ((48, 80), "bilinear", "squash"),
    ((64, 64), "bicubic", "longest"),      # resize the long side, pad with fill_color
    ((40, 72), "bilinear", "longest"),
])
def test_equals_open_clip_val_transform(size, interpolation, resize_mode, seed):
    rng = np.random.default_rng(seed)
    images = [random_image(rng, w, h, mode) for w, h in SIZES for mode in MODES]
    cfg = PreprocessCfg(size=size, mean=MEAN, std=STD, interpolation=interpolation,
                        resize_mode=resize_mode, fill_color=7)
    transform = image_transform_v2(cfg, is_train=False)
    expected = np.stack([transform(image.convert("RGB")).numpy() for image in images])
    got = ImagePreprocessor(model_info(size, interpolation, resize_mode, fill_color=7))(images)
    assert got.dtype == np.float32 and got.shape == (len(images), 3, *size)
    # Same resampling in Pillow, same float32 operations in the same order: no difference at all.
    assert np.abs(got - expected).max() == 0.0


def test_threads_and_batching_change_nothing(seed):
    rng = np.random.default_rng(seed)
    images = [random_image(rng, w, h, "RGB") for w, h in SIZES]
    info = model_info((64, 64), "bicubic", "shortest")
    batched = ImagePreprocessor(info, threads=4)(images)
    single = np.concatenate([ImagePreprocessor(info, threads=1)([image]) for image in images])
    assert np.array_equal(batched, single)


def test_head_only_model_has_no_image_preprocessing():
    info = ModelInfo(class_names=["a", "b"], scale=1.0, input_kind="features", embed_dim=4,
                     model_name="m")
    with pytest.raises(ValueError, match="head-only model takes image features"):
        ImagePreprocessor(info)
