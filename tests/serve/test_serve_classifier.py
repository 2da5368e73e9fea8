"""OnnxClassifier: images from files and PIL against open_clip's own preprocessing and a float64
truth, top-k, batching, streaming, damaged or foreign ONNX files, unreadable images, wrong
shapes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from fastprompt.serve import OnnxClassifier
from onnxlib import CLASS_NAMES, METHOD, SCALE, truth


def test_predict_files_and_pil_match_training_preprocessing(tiny, class_embeddings, tiny_export,
                                                           image_files):
    model, preprocess_val = tiny
    clf = OnnxClassifier(tiny_export[0], batch_size=2)  # the folder works too; 5 images, 3 chunks
    assert clf.provider == "CPUExecutionProvider"
    assert clf.class_names == CLASS_NAMES and clf.info.method == METHOD
    # open_clip's own transform on RGB images, as fastprompt.data loads them for training.
    x = torch.stack([preprocess_val(Image.open(p).convert("RGB")) for p in image_files])
    _, probs_true = truth(model.visual, class_embeddings, SCALE, x)
    probs = clf.predict_proba([str(p) for p in image_files])
    assert np.abs(probs - probs_true.numpy()).max() <= 1e-4
    pil = [Image.open(p).convert("RGB") for p in image_files]
    assert np.abs(clf.predict_proba(pil) - probs).max() <= 1e-6
    assert np.abs(clf.predict_proba(pil[3]) - probs[3:4]).max() <= 1e-6  # a single image

    top = clf.predict(image_files, top_k=3)
    assert len(top) == len(image_files)
    for row, pred in zip(probs_true.numpy(), top):
        order = np.argsort(-row)[:3]
        assert [c for c, _ in pred] == [CLASS_NAMES[i] for i in order]
        assert np.allclose([p for _, p in pred], row[order], atol=1e-4)
    assert len(clf.predict(image_files[:1], top_k=100)[0]) == len(CLASS_NAMES)


def test_predict_array_single_and_batched_agree(tiny_export, seed):
    x = np.random.default_rng(seed).standard_normal((9, 3, 64, 64)).astype(np.float32)
    whole = OnnxClassifier(tiny_export[0], batch_size=32).predict_proba(x)
    chunked = OnnxClassifier(tiny_export[0], batch_size=4).predict_proba(x)
    single = OnnxClassifier(tiny_export[0]).predict_proba(x[4])  # 3 x H x W: one image
    assert np.abs(whole - chunked).max() <= 1e-6
    assert np.abs(single - whole[4:5]).max() <= 1e-6
    assert np.allclose(whole.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("images, error, match", [
    (np.zeros((2, 1, 64, 64), np.float32), ValueError, r"images: expected 3 channels .* got 1"),
    (np.zeros((2, 3, 32, 32), np.float32), ValueError, r"images: expected preprocessed images 3 x 64 x 64"),
    (np.zeros((2, 64, 64, 3), np.float32), ValueError, r"images: expected 3 channels"),
    (np.zeros((64, 64), np.float32), ValueError, r"images: expected preprocessed images"),
    (np.zeros((0, 3, 64, 64), np.float32), ValueError, r"images: empty batch"),
    (np.zeros((1, 3, 64, 64), np.uint8), TypeError, r"images: expected a float array"),
    (np.full((1, 3, 64, 64), np.nan, np.float32), ValueError, r"images: contains NaN"),
    ([], ValueError, r"images: empty list"),
    ([3.0], TypeError, r"images\[0\]: expected a path or a PIL image"),
    (42, TypeError, r"images: expected paths, PIL images or an array"),
])
def test_bad_images(tiny_export, images, error, match):
    with pytest.raises(error, match=match):
        OnnxClassifier(tiny_export[0]).predict(images)


def test_unreadable_image_files(tiny_export, image_files, tmp_path):
    clf = OnnxClassifier(tiny_export[0])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(image_files[0].read_bytes()[:200])
    for bad in (text, truncated, tmp_path / "missing.png"):
        with pytest.raises(ValueError, match=r"images: .*" + bad.name):
            clf.predict([image_files[1], bad])


def _damaged_copies(path, folder, seed):
    data = path.read_bytes()
    rng = np.random.default_rng(seed)
    flipped = bytearray(data)
    flipped[:64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()  # header scrambled
    variants = {"empty.onnx": b"", "truncated.onnx": data[: len(data) // 2],
                "noise.onnx": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                "flipped.onnx": bytes(flipped), "text.onnx": b"hello, I am not a model\n"}
    for name, content in variants.items():
        (folder / name).write_bytes(content)
        yield folder / name


def test_damaged_model_files(tiny_export, tmp_path, seed):
    for bad in _damaged_copies(tiny_export[0] / "model.onnx", tmp_path, seed):
        with pytest.raises(ValueError, match=r"model: .*" + bad.name):
            OnnxClassifier(bad)
    with pytest.raises(ValueError, match=r"model: .*nowhere.onnx does not exist"):
        OnnxClassifier(tmp_path / "nowhere.onnx")


def test_foreign_onnx_model(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "other.onnx"
    onnx.save(onnx.helper.make_model(graph, producer_name="someone else"), str(path))
    with pytest.raises(ValueError, match=r"model: .*other.onnx is an ONNX model but not a fastprompt"):
        OnnxClassifier(path)


def test_damaged_metadata(tiny_export, tmp_path):
    model = onnx.load(str(tiny_export[0] / "model.onnx"))
    for p in model.metadata_props:
        if p.key == "fastprompt.class_names":
            p.value = "[1, 2"
    onnx.save(model, str(tmp_path / "meta.onnx"))
    with pytest.raises(ValueError, match=r"model: .*meta.onnx has damaged fastprompt metadata"):
        OnnxClassifier(tmp_path / "meta.onnx")


def test_explicit_cuda_without_gpu_raises(tiny_export):
    import onnxruntime as ort
    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises((ValueError, RuntimeError), match=r"providers: .*CUDAExecutionProvider"):
        OnnxClassifier(tiny_export[0], ["CUDAExecutionProvider"])


def test_iter_predict_matches_predict(tiny_export, image_files):
    clf = OnnxClassifier(tiny_export[0], batch_size=2)
    streamed = list(clf.iter_predict([str(p) for p in image_files], top_k=2))
    assert [s[0] for s in streamed] == [str(p) for p in image_files]
    assert [s[1] for s in streamed] == clf.predict(image_files, top_k=2)
    assert all(s[2] is None for s in streamed)
