"""Serving an exported classifier with onnxruntime: ``OnnxClassifier``.

Needs onnxruntime, numpy and Pillow only (``pip install fastprompt[serve]``): no torch, no
open_clip. Images are preprocessed from the model's own metadata exactly as training preprocessed
them (open_clip's evaluation transform on the RGB image; see ``ImagePreprocessor``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort

from fastprompt.export.metadata import ModelInfo, read_metadata_props

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")


def _gpu_present() -> bool:
    """Whether the CUDA driver sees a GPU (asked through libcuda, so no torch is needed)."""
    import ctypes
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu is installed and a GPU is present, else CPU only.

    The GPU wheel lists the CUDA provider even on machines without a GPU and logs an error when
    asked for it there, hence the GPU check.
    """
    if CUDA in ort.get_available_providers() and _gpu_present():
        return [CUDA, CPU]
    return [CPU]


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup (container) CPU quota.

    onnxruntime sizes its pool from the machine's physical cores, which in a container or under
    ``taskset`` can be many more than the process gets; oversubscribed threads spin against each
    other and run several times slower.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


# Instruction-set extensions onnxruntime's CPU kernels pick from (MLAS dispatches on them at run
# time): VNNI/AMX speed up int8 products, AVX-512 both.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_bf16", "amx_int8")


def cpu_description() -> dict:
    """The CPU model, the ISA flags among ``ISA_FLAGS`` it has, logical CPUs on the machine and
    ``available_cpus()``: what a CPU timing depends on."""
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "logical_cpus": os.cpu_count(), "available_cpus": available_cpus()}


def session_options(intra_op_num_threads: int | None = None) -> ort.SessionOptions:
    """The session options fastprompt serves with: every graph optimisation, one operator-level
    pool sized to the CPUs this process may use, operators run in sequence (one pool, no
    inter-op threads competing with it), the memory arena and memory-pattern planning on (the
    input shape repeats from call to call)."""
    if intra_op_num_threads is not None and (
            isinstance(intra_op_num_threads, bool) or not isinstance(intra_op_num_threads, int)
            or intra_op_num_threads < 0):
        raise ValueError(f"intra_op_num_threads: expected an int >= 0 (0 = onnxruntime's "
                         f"default), got {intra_op_num_threads!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = (available_cpus() if intra_op_num_threads is None
                                    else intra_op_num_threads)
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = True
    options.enable_mem_pattern = True
    return options


def create_session(path: str, info: ModelInfo, providers=None, *,
                   intra_op_num_threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime session for a fastprompt model, with the provider actually used checked.

    ``providers`` as onnxruntime takes them (names or ``(name, options)`` pairs); None picks
    ``default_providers()``. If CUDA is asked for explicitly and onnxruntime silently falls back
    to the CPU, this raises instead of running slowly. ``intra_op_num_threads``: None sizes the
    pool to ``available_cpus()``; 0 leaves it to onnxruntime.
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
    options = session_options(intra_op_num_threads)
    # onnxruntime 1.32 crashes (SIGSEGV) while applying its NCHWc layout transformer to the fp16
    # Conv of a converted model on the CPU provider; the transformer only helps fp32.
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


# ---------------------------------------------------------------------------------------------
# Preprocessing


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
        from PIL import Image
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
        return self.pixels(_open_image(item, index))

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


def _is_array_like(x) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "detach") and hasattr(x, "numpy")


def _is_pil(x) -> bool:
    from PIL import Image
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
            return image.copy()
    except FileNotFoundError:
        raise ValueError(f"images: {path} does not exist") from None
    except Image.DecompressionBombError as e:
        raise ValueError(f"images: {path} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"images: cannot read {path} as an image ({e})") from None


def list_images(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Image files named by ``sources``: files as given, folders walked (sorted, recursively)
    for files with an image extension."""
    paths = []
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            found = []
            for root, dirs, files in os.walk(source):
                dirs.sort()
                found += [os.path.join(root, f) for f in files
                          if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
            if not found:
                raise ValueError(f"images: folder {source} holds no image files "
                                 f"({', '.join(IMAGE_EXTENSIONS)})")
            paths += sorted(found)
        else:
            paths.append(source)
    return paths


def read_image_list(path: str | os.PathLike) -> list[str]:
    """Paths from a list file: one per line, blank lines and ``#`` comments skipped; relative
    paths are taken from the current folder."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ValueError(f"--list: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--list: cannot read {path} ({e})") from None
    paths = [line.strip() for line in lines]
    paths = [p for p in paths if p and not p.startswith("#")]
    if not paths:
        raise ValueError(f"--list: {path} names no images")
    return paths


# ---------------------------------------------------------------------------------------------
# The classifier


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
        items = [images] if isinstance(images, (str, os.PathLike)) or _is_pil(images) else images
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


def _check_top_k(top_k) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {top_k!r}")


__all__ = ["CPU", "CUDA", "ImagePreprocessor", "OnnxClassifier", "available_cpus", "cpu_description",
           "create_session", "default_providers", "list_images", "read_image_list",
           "resolve_model_path", "session_options"]
