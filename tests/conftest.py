"""Test-wide set-up and the fixtures every test folder shares.

* Without a CUDA GPU, Triton kernels run under the interpreter on CPU tensors: TRITON_INTERPRET
  must be set before triton is first imported, hence here.
* ``FASTPROMPT_REQUIRE_EXTENSION=1`` (set by ``make test``, so by CI) turns a C++ extension that
  did not build or load into a session error instead of a run where every C++ case is skipped.
* ``seed``: a fresh random seed per test, shown in the report of a failing test;
  ``FASTPROMPT_TEST_SEED=N`` replays one.
* ``tiny_clip``, ``tiny_text``, ``tiny_weights``: the tiny open_clip model (its seeded default
  weights), and those weights saved as a checkpoint file (so runs can name ``--pretrained``).
* ``shapes_data``, ``cached_shapes``, ``cached_shapes_tasks``: generated shapes data sets (and
  task sets), and feature caches of them built with the tiny model, each made once per session
  for each distinct set of arguments. They are read-only: at the end of the session, a file
  added, removed or changed in one of them is an error.
* ``tiny``, ``class_embeddings``, ``tiny_export``, ``image_files``: one float32 ONNX export of the
  tiny model and images to classify, shared by tests/export and tests/serve (their helpers are
  in tests/onnxlib.py).
"""
import dataclasses
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

# Before fastprompt is imported: triton reads TRITON_INTERPRET when it is imported (torchvision,
# under open_clip, imports it) and its decorator when the kernels are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fastprompt's own memo files (weights hashes) go to a throw-away folder, not ~/.cache.
os.environ.setdefault("FASTPROMPT_CACHE_DIR", tempfile.mkdtemp(prefix="fastprompt-test-cache-"))

from fastprompt.cli import main  # noqa: E402
from fastprompt.data import make_shapes_dataset  # noqa: E402
from onnxlib import CLASS_NAMES, METHOD, SCALE, random_image  # noqa: E402


def pytest_sessionstart(session):
    if os.environ.get("FASTPROMPT_REQUIRE_EXTENSION", "0") == "1":
        from fastprompt import _backend
        if not _backend.cpp_available():
            raise pytest.UsageError(
                "FASTPROMPT_REQUIRE_EXTENSION=1, but the C++ extension fastprompt._C did not load "
                f"({_backend.cpp_error()}); rebuild it with `make build`")


def _draw_seed() -> int:
    forced = os.environ.get("FASTPROMPT_TEST_SEED")
    return int(forced) if forced else int.from_bytes(os.urandom(4), "little")


_session_seed: int | None = None


@pytest.fixture
def seed(request):
    """A seed drawn for this test run (``FASTPROMPT_TEST_SEED`` replays a given one)."""
    value = _draw_seed()
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture(scope="session")
def session_seed():
    """One seed for the session's shared random data (generated images); every failure report
    shows it once it has been drawn."""
    global _session_seed
    _session_seed = _draw_seed()
    return _session_seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        seeds = [value for key, value in item.user_properties if key == "seed"]
        for value in seeds:
            report.sections.append(
                ("seed", f"seed {value}: replay with FASTPROMPT_TEST_SEED={value}"))
        if _session_seed is not None and _session_seed not in seeds:
            report.sections.append(
                ("session seed", f"session seed {_session_seed} (shared generated data): replay "
                 f"with FASTPROMPT_TEST_SEED={_session_seed}"))
    return report


@pytest.fixture(scope="session")
def tiny_clip():
    """(model, preprocess_train, preprocess_val, tokenizer) of fastprompt-tiny (64x64 images,
    embed_dim 64; weights: the fixed seeded draw). Shared: tests must not modify the model."""
    from fastprompt.models import TINY_MODEL, create_model
    return create_model(TINY_MODEL)


@pytest.fixture(scope="session")
def tiny_text(tiny_clip):
    """(model, tokenizer) of ``tiny_clip``."""
    return tiny_clip[0], tiny_clip[3]


@pytest.fixture(scope="session")
def tiny_weights(tiny_clip, tmp_path_factory):
    """Path of a .safetensors checkpoint holding ``tiny_clip``'s weights."""
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_clip[0].state_dict().items()}, str(path))
    return str(path)


class ReadOnlyGuard:
    """The files of the shared folders a session fixture made (path, size, modification
    time), taken when made and compared at the end of the session: a test that added, removed
    or changed one broke the fixture's read-only rule, which ``check`` reports."""

    def __init__(self, fixture: str):
        self.fixture = fixture
        self.listings: dict = {}

    @staticmethod
    def listing(folder: Path) -> dict:
        files = {}
        for parent, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(parent, name)
                st = os.lstat(path)
                files[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
        return files

    def watch(self, folder: Path) -> None:
        self.listings[folder] = self.listing(folder)

    def check(self) -> None:
        broken = []
        for folder, before in self.listings.items():
            after = self.listing(folder)
            added = sorted(after.keys() - before.keys())
            removed = sorted(before.keys() - after.keys())
            changed = sorted(k for k in before.keys() & after.keys() if before[k] != after[k])
            if added or removed or changed:
                broken.append(f"{folder}: added {added}, removed {removed}, changed {changed}")
        if broken:
            raise AssertionError(
                f"{self.fixture}: a test wrote into a shared, read-only folder (one that must "
                "write makes its own copy in its tmp_path):\n" + "\n".join(broken))


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """``shapes_data(classes=4, images_per_class=5, test_images_per_class=2, size=64,
    data_seed=3)``: a generated shapes data set (``make_shapes_dataset``: class folders under
    ``train/`` and ``test/``) and its ``DatasetSplits``, made once per session for each distinct
    set of arguments and shared. Returns ``(root, splits)``, ``root`` a ``Path``.

    Shared: a test must not change, add or remove files there (one that does makes its own
    data set with ``make_shapes_dataset`` in its ``tmp_path``)."""
    base = tmp_path_factory.mktemp("shapes_data")
    made: dict = {}
    guard = ReadOnlyGuard("shapes_data")

    def make(classes=4, *, images_per_class=5, test_images_per_class=2, size=64, data_seed=3):
        key = (classes, images_per_class, test_images_per_class, size, data_seed)
        if key not in made:
            root = base / f"shapes-{len(made)}"
            splits = make_shapes_dataset(root, num_classes=classes,
                                         images_per_class=images_per_class,
                                         test_images_per_class=test_images_per_class, size=size,
                                         seed=data_seed)
            made[key] = (root, splits)
            guard.watch(root)
        return made[key]
    yield make
    guard.check()


@dataclasses.dataclass(frozen=True)
class CachedShapes:
    """What ``cached_shapes`` gives: the data set (``root``, ``splits``), the ``CacheSpec`` the
    cache was built from, the cache, the tiny model it was built with (``tiny_clip``: ``model``,
    ``preprocess_train``, ``preprocess_val``, ``tokenizer``) and ``weights``, the path of a
    checkpoint file holding that model's weights (``tiny_weights``: for ``--pretrained`` and
    ``TrainConfig(pretrained=...)``; a model loaded from it has the same weights hash, so the
    cache is valid for it too)."""
    root: Path
    splits: object
    spec: object
    cache: object
    model: object
    preprocess_train: object
    preprocess_val: object
    tokenizer: object
    weights: str


@pytest.fixture(scope="session")
def cached_shapes(shapes_data, tiny_clip, tiny_weights, tmp_path_factory):
    """``cached_shapes(classes=4, *, views=2, shots=None, noise_rate=0.0,
    noise_type="symmetric", seed=1, batch_size=128, chunk_size=DEFAULT_CHUNK_SIZE,
    images_per_class=5, test_images_per_class=2, size=64, data_seed=3)``: a shapes data set
    (as ``shapes_data`` makes it, from ``classes`` ... ``data_seed``) and its feature cache
    built with ``tiny_clip``'s model (from ``views`` ... ``chunk_size``, the ``CacheSpec``
    arguments; ``seed`` draws the shots, the label noise and the views), as a
    :class:`CachedShapes` record (``.root``, ``.splits``, ``.spec``, ``.cache``, ``.model``,
    ``.preprocess_train``, ``.preprocess_val``, ``.tokenizer``, ``.weights``).

    Made once per session for each distinct set of arguments, in a session folder (the cache
    alone in its own folder: ``cache.path``'s folder holds nothing else), and shared by every
    test that asks for the same arguments: a test must not write to the data set, the cache
    file or its folder, nor change the model. A test of building itself (killed builds, damaged
    files, rebuilds, workers, ...) builds its own cache in its ``tmp_path``.

    For a module-scoped ``setup``/``world`` fixture that built its own, e.g.::

        shared = cached_shapes(4, images_per_class=6, test_images_per_class=3, data_seed=5,
                               views=3, noise_rate=0.25, seed=2)
        return shared.model, shared.tokenizer, shared.cache, shared.weights
    """
    from fastprompt.data.cache import DEFAULT_CHUNK_SIZE, CacheSpec, build_feature_cache
    model, preprocess_train, preprocess_val, tokenizer = tiny_clip
    base = tmp_path_factory.mktemp("cached_shapes")
    built: dict = {}
    guard = ReadOnlyGuard("cached_shapes")

    def make(classes=4, *, views=2, shots=None, noise_rate=0.0, noise_type="symmetric", seed=1,
             batch_size=128, chunk_size=DEFAULT_CHUNK_SIZE, images_per_class=5,
             test_images_per_class=2, size=64, data_seed=3) -> CachedShapes:
        data = dict(images_per_class=images_per_class,
                    test_images_per_class=test_images_per_class, size=size, data_seed=data_seed)
        options = dict(views=views, shots=shots, noise_rate=noise_rate, noise_type=noise_type,
                       seed=seed, batch_size=batch_size, chunk_size=chunk_size)
        key = (classes, tuple(sorted(data.items())), tuple(sorted(options.items())))
        if key not in built:
            root, splits = shapes_data(classes, **data)
            spec = CacheSpec(model, "fastprompt-tiny", preprocess_train, preprocess_val, splits,
                             **options)
            folder = base / f"cache-{len(built)}"
            folder.mkdir()
            cache = build_feature_cache(folder / "cache.safetensors", spec, progress=False)
            built[key] = CachedShapes(root, splits, spec, cache, model, preprocess_train,
                                      preprocess_val, tokenizer, tiny_weights)
            guard.watch(folder)
        return built[key]
    yield make
    guard.check()


@dataclasses.dataclass(frozen=True)
class CachedShapesTasks:
    """What ``cached_shapes_tasks`` gives: the tasks file (``make_shapes_tasks``) and its task
    specs (``read_tasks_file``), one ``fastprompt.train.Task(name, cache)`` per task in the
    file's order (a tuple), and the tiny model the caches were built with, as in
    :class:`CachedShapes`."""
    tasks_file: str
    specs: tuple
    tasks: tuple
    model: object
    preprocess_train: object
    preprocess_val: object
    tokenizer: object
    weights: str


@pytest.fixture(scope="session")
def cached_shapes_tasks(tiny_clip, tiny_weights, tmp_path_factory):
    """``cached_shapes_tasks(num_tasks=3, classes_per_task=3, *, views=2, shots=None,
    noise_rate=0.0, noise_type="symmetric", seed=1, batch_size=128,
    chunk_size=DEFAULT_CHUNK_SIZE, images_per_class=5, test_images_per_class=2, size=64,
    data_seed=3)``: a generated shapes task set (``make_shapes_tasks``: ``num_tasks`` data sets
    of ``classes_per_task`` disjoint classes, from ``images_per_class`` ... ``data_seed``) and a
    feature cache of each task built with ``tiny_clip``'s model (from ``views`` ...
    ``chunk_size``, the ``CacheSpec`` arguments), as a :class:`CachedShapesTasks` record
    (``.tasks_file``, ``.specs``, ``.tasks``, ``.model``, ...).

    Made once per session for each distinct set of arguments and shared, read-only, as
    ``cached_shapes``: a test must not write to the task folders, the tasks file or the caches'
    folder. For a SoftCPT ``setup`` fixture that built its own, e.g.::

        shared = cached_shapes_tasks(3, 3, images_per_class=4, test_images_per_class=2,
                                     size=32, data_seed=4, views=2, noise_rate=0.25, seed=2)
        return shared.model, shared.tokenizer, list(shared.tasks), shared.weights
    """
    from fastprompt.data import load_dataset
    from fastprompt.data.cache import DEFAULT_CHUNK_SIZE, CacheSpec, build_feature_cache
    from fastprompt.data.tasks import make_shapes_tasks, read_tasks_file
    from fastprompt.train import Task
    model, preprocess_train, preprocess_val, tokenizer = tiny_clip
    base = tmp_path_factory.mktemp("cached_shapes_tasks")
    built: dict = {}
    guard = ReadOnlyGuard("cached_shapes_tasks")

    def make(num_tasks=3, classes_per_task=3, *, views=2, shots=None, noise_rate=0.0,
             noise_type="symmetric", seed=1, batch_size=128, chunk_size=DEFAULT_CHUNK_SIZE,
             images_per_class=5, test_images_per_class=2, size=64,
             data_seed=3) -> CachedShapesTasks:
        data = dict(num_tasks=num_tasks, classes_per_task=classes_per_task,
                    images_per_class=images_per_class,
                    test_images_per_class=test_images_per_class, size=size, seed=data_seed)
        options = dict(views=views, shots=shots, noise_rate=noise_rate, noise_type=noise_type,
                       seed=seed, batch_size=batch_size, chunk_size=chunk_size)
        key = (tuple(sorted(data.items())), tuple(sorted(options.items())))
        if key not in built:
            root = base / f"tasks-{len(built)}"
            tasks_file = make_shapes_tasks(root / "data", **data)
            specs = tuple(read_tasks_file(tasks_file))
            folder = root / "caches"
            folder.mkdir()
            tasks = []
            for i, task in enumerate(specs):
                spec = CacheSpec(model, "fastprompt-tiny", preprocess_train, preprocess_val,
                                 load_dataset(task.data), **options)
                cache = build_feature_cache(folder / f"cache-{i}.safetensors", spec,
                                            progress=False)
                tasks.append(Task(task.name, cache))
            built[key] = CachedShapesTasks(tasks_file, specs, tuple(tasks), model,
                                           preprocess_train, preprocess_val, tokenizer,
                                           tiny_weights)
            guard.watch(root)
        return built[key]
    yield make
    guard.check()


# ----- exported classifiers (tests/export, tests/serve) -------------------------------------------


@pytest.fixture(scope="session")
def tiny(tiny_clip):
    """(model, preprocess_val) of ``tiny_clip``."""
    return tiny_clip[0], tiny_clip[2]


@pytest.fixture(scope="session")
def class_embeddings():
    """Unnormalised C x 64 text features (rows of different norms, as a text tower gives)."""
    g = torch.Generator().manual_seed(1234)
    t = torch.randn(len(CLASS_NAMES), 64, generator=g)
    return t * torch.linspace(0.3, 5.0, len(CLASS_NAMES))[:, None]


@pytest.fixture(scope="session")
def tiny_export(tiny, class_embeddings, tmp_path_factory):
    """An fp32 export of the tiny model; ``(out_dir, report)``. Tests must not modify it."""
    from fastprompt.export import TritonSettings, export_onnx  # loads onnx: only when asked for
    out = tmp_path_factory.mktemp("tiny_export")
    report = export_onnx(tiny[0], class_embeddings, CLASS_NAMES, out, scale=SCALE,
                         model_name="fastprompt-tiny", method=METHOD,
                         triton=TritonSettings(name="tiny_clf"))
    return out, report


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, session_seed):
    """Five images of odd sizes and modes (RGB, grayscale, RGBA, palette), as PNG and JPEG."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(session_seed)
    paths = []
    for i, (size, mode, ext) in enumerate([((50, 80), "RGB", "png"), ((97, 31), "L", "png"),
                                           ((64, 64), "RGBA", "png"), ((120, 90), "RGB", "jpg"),
                                           ((33, 65), "P", "png")]):
        paths.append(folder / f"img{i}.{ext}")
        random_image(rng, *size, mode).save(paths[-1])
    return paths


@pytest.fixture
def within():
    """``within(seconds, fn, *args, fifos=())``: ``fn(*args)``'s result, failing the test instead
    of hanging when it does not return within ``seconds`` (a FIFO opened for reading blocks until
    a writer comes: each of ``fifos`` is then opened for writing once, which lets the stuck
    reader go on)."""
    def run(seconds, fn, *args, fifos=()):
        outcome = {}

        def target():
            try:
                outcome["value"] = fn(*args)
            except BaseException as e:  # re-raised in the test's thread
                outcome["error"] = e
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(seconds)
        if thread.is_alive():
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            thread.join(10)
            pytest.fail(f"{getattr(fn, '__name__', fn)} did not return within {seconds} s "
                        "(blocked on a FIFO?)")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]
    return run


@pytest.fixture
def cli():
    """``cli(argv)``: ``fastprompt ARGV`` in this process; returns the exit code."""
    return main


@pytest.fixture(scope="session")
def cli_world(tmp_path_factory, tiny_weights):
    """A folder holding ``shapes/`` (3 shape classes, 4 training and 2 test images each) and
    ``tiny.safetensors`` (the tiny model's weights), for runs through the command line. Shared:
    tests write their caches and runs in their own ``tmp_path``."""
    root = tmp_path_factory.mktemp("cli_world")
    make_shapes_dataset(root / "shapes", num_classes=3, images_per_class=4,
                        test_images_per_class=2, seed=9)
    os.link(tiny_weights, root / "tiny.safetensors")
    return root


@pytest.fixture(scope="session")
def cli_args(cli_world):
    """The ``cache``/``train`` arguments naming ``cli_world``'s weights and data, 2 views."""
    return ["--pretrained", str(cli_world / "tiny.safetensors"), "--data",
            str(cli_world / "shapes"), "--views", "2"]
