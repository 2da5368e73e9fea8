"""``OnnxClassifier``: an exported fastprompt classifier run by onnxruntime, from image paths,
PIL images, preprocessed arrays or (head-only models) image features to class probabilities."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastprompt.serve.images import is_pil_image
from fastprompt.serve.metadata import ModelInfo, read_metadata_props
from fastprompt.serve.preprocess import ImagePreprocessor
from fastprompt.serve.session import create_session, resolve_model_path


def _is_array_like(x) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "detach") and hasattr(x, "numpy")


class OnnxClassifier:
    """An exported fastprompt classifier, run by onnxruntime.

    Args:
        path: ``model.onnx`` written by ``export_onnx`` (or the export folder).
        providers: onnxruntime execution providers; None picks CUDA when onnxruntime-gpu and a GPU
            are present, else the CPU. ``self.provider`` says which one runs.
        batch_size: inputs are run in chunks of at most this many images.
        intra_op_num_threads: onnxruntime's thread count for one operator (None: the CPUs this
            process may use, ``available_cpus()``; 0: onnxruntime's own default).

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
        self._preprocessor = None
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if inputs != [self.info.input_name] or outputs[:2] != ["logits", "probs"]:
            raise ValueError(f"model: {self.path} has inputs {inputs} and outputs {outputs}, but "
                             f"its metadata promises [{self.info.input_name!r}] and ['logits', "
                             "'probs']; the file was altered")
        _check_against_graph(self.path, self.info, self.session)

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def preprocessor(self) -> ImagePreprocessor:
        """The image preprocessing of this model (``ImagePreprocessor``)."""
        if self.info.input_kind == "features":
            raise TypeError("images: this is a head-only model; pass image features as an N x "
                            f"{self.info.embed_dim} array, not images or paths")
        if self._preprocessor is None:
            self._preprocessor = ImagePreprocessor(self.info)
        return self._preprocessor

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
        outs = [self._run_batch(inputs[i:i + self.batch_size])
                for i in range(0, len(inputs), self.batch_size)]
        return (np.concatenate([o[0] for o in outs]).astype(np.float32, copy=False),
                np.concatenate([o[1] for o in outs]).astype(np.float32, copy=False))

    def _run_batch(self, inputs: np.ndarray) -> list[np.ndarray]:
        return self.session.run(["logits", "probs"], {self.info.input_name: inputs})

    def predict_proba(self, images) -> np.ndarray:
        """Class probabilities, N x C float32; ``images`` as in ``run``."""
        return self.run(images)[1]

    def predict(self, images, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``top_k`` classes of each image as ``(class name, probability)``, most likely first;
        one list per image, in input order. ``images`` as in ``run``."""
        _check_top_k(top_k)
        return self._top_k(self.predict_proba(images), top_k)

    def iter_predict(self, paths: Sequence, top_k: int = 5, *, skip_unreadable: bool = False
                     ) -> Iterator[tuple[object, list[tuple[str, float]] | None, str | None]]:
        """Stream ``(path, top_k predictions, None)`` per image, in order, one batch at a time:
        the next batch is decoded in the thread pool while onnxruntime runs this one. With
        ``skip_unreadable`` an unreadable image yields ``(path, None, error)`` instead of
        raising."""
        _check_top_k(top_k)
        if len(paths) == 0:
            raise ValueError("images: empty list")
        pre = self.preprocessor
        chunks = [list(range(i, min(i + self.batch_size, len(paths))))
                  for i in range(0, len(paths), self.batch_size)]

        def load(index):
            try:
                return pre.load(paths[index], index), None
            except ValueError as e:
                if not skip_unreadable:
                    raise
                return None, str(e)

        with ThreadPoolExecutor(pre.threads, thread_name_prefix="fastprompt-decode") as pool:
            pending = [pool.submit(load, i) for i in chunks[0]]
            for n, chunk in enumerate(chunks):
                loaded = [f.result() for f in pending]
                pending = ([pool.submit(load, i) for i in chunks[n + 1]]
                           if n + 1 < len(chunks) else [])
                good = [k for k, (pixels, _) in enumerate(loaded) if pixels is not None]
                top = {}
                if good:
                    batch = pre.normalize(np.stack([loaded[k][0] for k in good]))
                    probs = self._run_batch(batch)[1].astype(np.float32, copy=False)
                    top = dict(zip(good, self._top_k(probs, top_k)))
                for k, index in enumerate(chunk):
                    yield paths[index], top.get(k), loaded[k][1]

    def _top_k(self, probs: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
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
        pre = self.preprocessor
        items = [images] if isinstance(images, (str, os.PathLike)) or is_pil_image(images) else images
        if not isinstance(items, Sequence) or isinstance(items, (bytes, bytearray, str)):
            raise TypeError(f"images: expected paths, PIL images or an array, got "
                            f"{type(images).__name__}")
        if len(items) == 0:
            raise ValueError("images: empty list")
        return pre(items)

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


def _check_against_graph(path: str, info: ModelInfo, session) -> None:
    """Refuse metadata that disagrees with the graph's fixed dimensions (image size, feature
    size, number of classes): serving trusts the metadata for preprocessing and for naming the
    scores, so a mismatch would allocate without bound, index past the class names or fail
    inside onnxruntime. Dimensions the graph leaves free are not compared."""
    def fixed(dim):
        return dim if isinstance(dim, int) and not isinstance(dim, bool) else None

    shape = list(session.get_inputs()[0].shape)
    problems = []
    if info.input_kind == "image":
        expected = [3, *info.image_size]
        graph = [fixed(d) for d in shape[1:]]
        if len(shape) != 4 or any(g is not None and g != e for g, e in zip(graph, expected)):
            problems.append(f"image_size {list(info.image_size)} but its graph takes images of "
                            f"shape {' x '.join(str(d) for d in shape[1:])}")
    elif len(shape) != 2 or fixed(shape[1]) not in (None, info.embed_dim):
        problems.append(f"embed_dim {info.embed_dim} but its graph takes features of shape "
                        f"{' x '.join(str(d) for d in shape[1:])}")
    for output in session.get_outputs()[:2]:
        scores = fixed(output.shape[-1]) if len(output.shape) == 2 else -1
        if scores not in (None, info.num_classes):
            problems.append(f"{info.num_classes} class names but its graph gives "
                            f"{output.shape[-1] if scores != -1 else output.shape} scores per "
                            f"image ({output.name})")
            break
    if problems:
        raise ValueError(f"model: {path}: its metadata says " + "; ".join(problems)
                         + "; the file was altered")


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")

