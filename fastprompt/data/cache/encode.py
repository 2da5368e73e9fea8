"""Encoding: the frozen image tower runs over the images of a plan's chunks and each chunk's
features go to its file (:func:`encode_cache_chunks`).

Training images get ``views`` augmented views each (``preprocess_train``, plus a horizontal flip
when the plan adds one), drawn with torch's generator seeded per (image, view)
(:func:`~fastprompt.data.cache.spec.view_seed`), so a rebuild is bit-identical; test and
validation images get one plain view (``preprocess_val``).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor

from fastprompt._checks import check_int
from fastprompt._io import open_regular_file, progress_bar
from fastprompt.data.cache.chunks import chunk_problem, file_key, write_chunk
from fastprompt.data.cache.plan import CacheChunk, CachePlan, torchrun_rank
from fastprompt.data.cache.spec import check_path, check_run_options, view_seed

logger = logging.getLogger("fastprompt.data")


def open_rgb(path: str) -> Image.Image:
    """The image at ``path`` as RGB (``ValueError`` naming a file that cannot be decoded)."""
    try:
        # Regular files only: a FIFO named like an image would block the build forever.
        file = open_regular_file(path)
    except ValueError as e:
        raise ValueError(f"splits: image file {e}") from None
    except OSError as e:
        raise _undecodable(path, e) from None
    try:
        with file, Image.open(file) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises many exception types for bad files
        raise _undecodable(path, e) from None


def _undecodable(path: str, e: Exception) -> ValueError:
    return ValueError(f"splits: image file {path!r} cannot be decoded ({type(e).__name__}: {e})")


class ImageViews(torch.utils.data.Dataset):
    """Item ``m``: a (views, C, H, W) stack of transformed views of image ``m``, and ``m``.
    ``seed`` None: one view, the transform alone (no seeding, no flip)."""

    def __init__(self, paths: list[str], transform: Callable, transform_name: str, views: int,
                 seed: int | None, flip: bool):
        self.paths, self.transform, self.transform_name = paths, transform, transform_name
        self.views, self.seed, self.flip = views, seed, flip

    def __len__(self) -> int:
        return len(self.paths)

    def _apply(self, img) -> Tensor:
        x = self.transform(img)
        if not isinstance(x, Tensor) or x.dim() != 3:
            got = f"a tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else \
                type(x).__name__
            raise TypeError(f"{self.transform_name}: expected a transform returning a C x H x W "
                            f"tensor, got {got}")
        # A flip after Normalize equals one before it (per-channel ops commute with it).
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        return x

    def __getitem__(self, m: int):
        img = open_rgb(self.paths[m])
        if self.seed is None:
            return self._apply(img).unsqueeze(0), m
        out = []
        for v in range(self.views):
            # The transforms draw from torch's global generator: seed it per (image, view) and
            # leave the caller's generator state untouched.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, m, v))
                out.append(self._apply(img))
        return torch.stack(out), m


def encode_batch(model, images: Tensor, index: Tensor, paths: list[str], *,
                 device: torch.device, dtype: torch.dtype) -> Tensor:
    """Features of a batch of (b, views, C, H, W) images: (b, views, D) float16 on the host."""
    b, k = images.shape[:2]
    x = images.reshape(b * k, *images.shape[2:]).to(device, dtype, non_blocking=True)
    feats = model.encode_image(x).float().reshape(b, k, -1)
    if not torch.isfinite(feats).all():
        raise ValueError(f"model: image features of {paths[int(index[0])]!r} (or its batch) are "
                         "not finite")
    feats = feats.half().cpu()
    if not torch.isfinite(feats).all():
        raise ValueError("model: image features overflow float16 (|x| > 65504)")
    return feats


def encode_cache_chunks(plan: CachePlan, chunks, model: torch.nn.Module, *,
                        num_workers: int = 0, progress: bool | None = None) -> list[int]:
    """Encode the chunks ``chunks`` (indices into ``plan.chunks``) of ``plan`` with ``model``
    and write each to its file (atomically: a killed process leaves whole chunk files only).
    A chunk whose file is already valid (same fingerprint and place, checksum intact) is
    skipped; a damaged or foreign one is encoded again. Returns the indices encoded.

    The model runs where its parameters are, in their dtype, under ``torch.inference_mode``.
    Any process may encode any chunks: spread ``range(len(plan.chunks))`` over the workers
    (e.g. worker r of W takes ``r::W``), then call
    :func:`~fastprompt.data.cache.merge_cache_chunks` once.
    """
    if not isinstance(plan, CachePlan):
        raise TypeError(f"plan: expected a CachePlan, got {type(plan).__name__}")
    check_path(plan.path)
    check_int("batch_size", plan.batch_size, 1)
    check_run_options(num_workers, progress)
    ids = list(chunks)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(plan.chunks):
            raise ValueError(f"chunks: {i!r} is not a chunk index of the plan (0 to "
                             f"{len(plan.chunks) - 1})")
    return encode_chunks(plan, ids, model, num_workers=num_workers, progress=progress,
                         verified={})


def encode_chunks(plan: CachePlan, ids: list[int], model, *, num_workers: int,
                  progress: bool | None, verified: dict) -> list[int]:
    """As :func:`encode_cache_chunks` (arguments unchecked); records in ``verified`` the file
    key of every chunk file found valid or written."""
    todo = []
    for i in ids:
        problem = chunk_problem(plan, plan.chunks[i])
        if problem is None:
            verified[i] = file_key(plan.chunk_path(i))
        else:
            if problem != "missing":
                logger.warning("fastprompt: encoding cache chunk %d again: %s (%s)", i, problem,
                               plan.chunk_path(i))
            todo.append(plan.chunks[i])
    if not todo:
        return []

    def views(chunks):
        return sum((c.stop - c.start) * plan.split_views(c.split) for c in chunks)
    rank, world = torchrun_rank()
    desc = "caching features" + (f" (rank {rank} of {world})" if world > 1 else "")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        # A resumed build's bar starts at the views its valid chunk files already hold.
        with torch.inference_mode(), progress_bar(
                views(plan.chunks[i] for i in ids), desc, progress,
                initial=views(plan.chunks[i] for i in ids) - views(todo)) as bar:
            for split in ("train", "test", "val"):
                mine = [c for c in todo if c.split == split]
                if mine:
                    _encode_split(plan, split, mine, model, num_workers=num_workers,
                                  device=device, dtype=dtype, bar=bar, verified=verified)
    except BaseException:
        try:  # the chunk files written stay for the next build; an empty folder does not
            os.rmdir(plan.chunk_dir)
        except OSError:
            pass
        raise
    finally:
        model.train(was_training)
    return [c.index for c in todo]


def _encode_split(plan: CachePlan, split: str, chunks: list[CacheChunk], model, *,
                  num_workers: int, device, dtype, bar, verified: dict) -> None:
    paths = [p for p, _ in plan.images(split)]
    k = plan.split_views(split)
    if split == "train":
        dataset = ImageViews(paths, plan.preprocess_train, "preprocess_train", k,
                             plan.fingerprint["seed"], plan.add_flip)
    else:
        dataset = ImageViews(paths, plan.preprocess_val, "preprocess_val", 1, None, False)
    per = plan.encoder_batch(split)
    batches = [list(range(s, min(s + per, c.stop))) for c in chunks
               for s in range(c.start, c.stop, per)]
    # One loader over all the chunks: its workers start once, not once per chunk.
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0)))  # else it draws its base seed globally
    for c in chunks:
        out = None
        for s in range(c.start, c.stop, per):
            images, index = next(loader)
            feats = encode_batch(model, images, index, paths, device=device, dtype=dtype)
            if out is None:
                out = torch.empty(k, c.stop - c.start, feats.shape[-1], dtype=torch.float16)
            out[:, s - c.start:s - c.start + feats.shape[0]] = feats.transpose(0, 1)
            bar.update(feats.shape[0] * k)
        write_chunk(plan, c, out)
        verified[c.index] = file_key(plan.chunk_path(c.index))
