"""Serving an exported classifier with onnxruntime: ``OnnxClassifier``.

onnxruntime, numpy and the file's metadata are all it needs for preprocessed arrays; image files
and PIL images go through open_clip's own evaluation transform, rebuilt from the metadata, so
serving preprocesses exactly as training did.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from fastprompt.export.metadata import ModelInfo, read_metadata_props

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _gpu_present() -> bool:
    try:
        import torch
    except ImportError:  # serving without torch: trust onnxruntime's own fallback
        return True
    return torch.cuda.is_available()


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu is installed and a GPU is present, else CPU only.

    The GPU wheel lists the CUDA provider even on machines without a GPU and logs an error when
    asked for it there, hence the GPU check.
    """
    if CUDA in ort.get_available_providers() and _gpu_present():
        return [CUDA, CPU]
    return [CPU]


def create_session(path: str, info: ModelInfo, providers=None, *,
                   intra_op_num_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session for a fastprompt model, with the provider actually used checked.

    ``providers`` as onnxruntime takes them (names or ``(name, options)`` pairs); None picks
    ``default_providers()``. If CUDA is asked for explicitly and onnxruntime silently falls back
    to the CPU, this raises instead of running slowly.
    """
    explicit = providers is not None
    providers = list(providers) if explicit else default_providers()
    if not providers:
        raise ValueError("providers: empty list; pass None for the default")
    requested = [p if isinstance(p, str) else p[0] for p in providers]
    unknown = [p for p in requested if p not in ort.get_available_providers()]
    if unknown:
        raise ValueError(f"providers: {unknown} not available in this onnxruntime (available: "
                         f"{ort.get_available_providers()}); onnxruntime and onnxruntime-gpu "
                         "exclude each other, install one")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_num_threads is not None:
        if isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int) \
                or intra_op_num_threads < 0:
            raise ValueError(f"intra_op_num_threads: expected an int >= 0 (0 = onnxruntime's "
                             f"default), got {intra_op_num_threads!r}")
        options.intra_op_num_threads = intra_op_num_threads
    # onnxruntime 1.32 crashes (SIGSEGV) while applying its NCHWc layout transformer to the fp16
    # Conv of a converted model on the CPU provider (seen here); the transformer only helps fp32.
    disabled = ["NchwcTransformer"] if info.precision == "float16" and CPU in requested else []
    try:
        session = ort.InferenceSession(path, options, providers=providers,
                                       disabled_optimizers=disabled or None)
    except Exception as e:  # onnxruntime raises its own exception types, with the reason inside
        raise ValueError(f"model: onnxruntime cannot load {path} (damaged file, or a graph this "
                         f"onnxruntime cannot run): {e}") from None
    used = session.get_providers()
    if explicit and requested[0] == CUDA and used[0] != CUDA:
        raise RuntimeError(f"providers: CUDAExecutionProvider was requested but onnxruntime runs "
                           f"{used[0]} (no GPU, or CUDA libraries missing; see onnxruntime's log)")
    logger.info("fastprompt: %s runs on %s", path, used[0])
    return session


def resolve_model_path(model: str | os.PathLike) -> str:
    """An export folder means its ``model.onnx``; a file is taken as is."""
    path = os.fspath(model)
    if os.path.isdir(path):
        path = os.path.join(path, "model.onnx")
    if not os.path.isfile(path):
        raise ValueError(f"model: {path} does not exist (expected an exported model.onnx or "
                         "the folder holding it)")
    return path


class OnnxClassifier:
    """An exported fastprompt classifier, run by onnxruntime.

    Args:
        path: ``model.onnx`` written by ``export_onnx`` (or the export folder).
        providers: onnxruntime execution providers; None picks CUDA when onnxruntime-gpu and a GPU
            are present, else the CPU. ``self.provider`` says which one runs.
        batch_size: inputs are run in chunks of at most this many images.
        intra_op_num_threads: onnxruntime's thread count for one operator (None: its default).

    ``self.info`` holds the metadata (class names, scale, preprocessing, model name, method).
    """

    def __init__(self, path: str | os.PathLike, providers=None, *, batch_size: int = 32,
                 intra_op_num_threads: int | None = None):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.path = resolve_model_path(path)
        self.info = ModelInfo.from_props(read_metadata_props(self.path), self.path)
        self.session = create_session(self.path, self.info, providers,
                                      intra_op_num_threads=intra_op_num_threads)
        self.provider = self.session.get_providers()[0]
        self.batch_size = batch_size
        self._transform = None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [self.info.input_name] or outputs[:2] != ["logits", "probs"]:
            raise ValueError(f"model: {self.path} has inputs {inputs} and outputs {outputs}, but "
                             f"its metadata promises [{self.info.input_name!r}] and ['logits', "
                             "'probs']; the file was altered")

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def __repr__(self) -> str:
        return (f"OnnxClassifier({self.path!r}, model={self.info.model_name!r}, "
                f"classes={self.info.num_classes}, input={self.info.input_kind}, "
                f"precision={self.info.precision}, provider={self.provider!r})")

    def run(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Both outputs of the graph, ``(logits, probs)``, each N x C float32 in input order.

        ``images``: a file path, a PIL image, or a list of them; or a preprocessed float array or
        tensor, N x 3 x H x W (one image: 3 x H x W). A head-only model takes image features,
        N x D (one: D). Large inputs run in chunks of ``batch_size``.
        """
        inputs = self.prepare(images)
        name = self.info.input_name
        outs = [self.session.run(["logits", "probs"], {name: inputs[i:i + self.batch_size]})
                for i in range(0, len(inputs), self.batch_size)]
        return (np.concatenate([o[0] for o in outs]).astype(np.float32, copy=False),
                np.concatenate([o[1] for o in outs]).astype(np.float32, copy=False))

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities, N x C float32; ``images`` as in ``run``."""
        return self.run(images)[1]

    def predict(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top_k`` classes of each image as ``(class name, probability)``, most likely first;
        one list per image, in input order. ``images`` as in ``run``."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")
        probs = self.predict_proba(images)
        k = min(top_k, probs.shape[1])
        # Stable sort on the negated row: ties keep class order, so results are reproducible.
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        names = self.info.class_names
        return [[(names[c], float(row[c])) for c in idx] for row, idx in zip(probs, order)]

    def prepare(self, images) -> np.ndarray:
        """The model's input array (float32, C-contiguous) for ``images``, checked against the
        model's input shape."""
        if _is_array_like(images):
            return self._check_array(images)
        if self.info.input_kind == "features":
            raise TypeError("images: this is a head-only model; pass image features as an N x "
                            f"{self.info.embed_dim} array, not images or paths")
        items = [images] if isinstance(images, (str, os.PathLike)) or _is_pil(images) else images
        if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray)):
            raise TypeError(f"images: expected paths, PIL images or an array, got "
                            f"{type(images).__name__}")
        if len(items) == 0:
            raise ValueError("images: empty list")
        transform = self._image_transform()
        return np.stack([transform(_open_image(item, i)).numpy() for i, item in enumerate(items)])

    def _check_array(self, images) -> np.ndarray:
        if hasattr(images, "detach"):  # a torch tensor
            images = images.detach().cpu().numpy()
        images = np.asarray(images)
        if not np.issubdtype(images.dtype, np.floating):
            raise TypeError(f"images: expected a float array (preprocessed), got {images.dtype}")
        info = self.info
        if info.input_kind == "features":
            per_item, what = (info.embed_dim,), f"image features of size {info.embed_dim}"
        else:
            per_item, what = (3, *info.image_size), "preprocessed images 3 x {} x {}".format(
                *info.image_size)
        if images.ndim == len(per_item):
            images = images[None]
        if images.ndim != len(per_item) + 1:
            raise ValueError(f"images: expected {what} (batch x {' x '.join(map(str, per_item))}), "
                             f"got shape {images.shape}")
        if images.shape[0] == 0:
            raise ValueError("images: empty batch")
        if info.input_kind == "image" and images.shape[1] != 3:
            raise ValueError(f"images: expected 3 channels (RGB) in dimension 1, got "
                             f"{images.shape[1]} (shape {images.shape})")
        if images.shape[1:] != per_item:
            raise ValueError(f"images: expected {what}, got shape {images.shape}")
        if not np.isfinite(images).all():
            raise ValueError("images: contains NaN or infinite values")
        return np.ascontiguousarray(images, dtype=np.float32)

    def _image_transform(self):
        if self._transform is None:
            from open_clip.transform import PreprocessCfg, image_transform_v2
            info = self.info
            cfg = PreprocessCfg(size=tuple(info.image_size), mean=tuple(info.mean),
                                std=tuple(info.std), interpolation=info.interpolation,
                                resize_mode=info.resize_mode, fill_color=info.fill_color)
            self._transform = image_transform_v2(cfg, is_train=False)
        return self._transform


def _is_array_like(x) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "detach") and hasattr(x, "numpy")


def _is_pil(x) -> bool:
    try:
        from PIL import Image
    except ImportError:
        return False
    return isinstance(x, Image.Image)


def _open_image(item, index: int):
    """A PIL image from a path or a PIL image; unreadable files raise naming the file."""
    if _is_pil(item):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(f"images[{index}]: expected a path or a PIL image, got {type(item).__name__}")
    from PIL import Image, UnidentifiedImageError
    path = os.fspath(item)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, naming the file
            return image.copy() if image.mode == "RGB" else image.convert("RGB")
    except FileNotFoundError:
        raise ValueError(f"images: {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"images: cannot read {path} as an image ({e})") from None
