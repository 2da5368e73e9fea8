"""Images to classify: opening one (a path or a PIL image, unreadable files named in the error),
finding the image files in folders, and reading a list file of paths.

Only regular files are images: a FIFO, socket or device named like an image is skipped (and
listed in a warning) when a folder is searched, and refused by name when it is named itself
(opening a FIFO would wait for a writer forever)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from PIL import Image, UnidentifiedImageError

from fastprompt._io import IMAGE_EXTENSIONS, open_regular_file, regular_file_problem

logger = logging.getLogger("fastprompt.serve")


def is_pil_image(x) -> bool:
    return isinstance(x, Image.Image)


def open_image(item, index: int) -> Image.Image:
    """A PIL image from a path or a PIL image; unreadable files raise naming the file
    (``index``: the item's place in the caller's list, for a wrong type)."""
    if is_pil_image(item):
        return item
    if not isinstance(item, (str, os.PathLike)):
        raise TypeError(f"images[{index}]: expected a path or a PIL image, got {type(item).__name__}")
    path = os.fspath(item)
    try:
        file = open_regular_file(path)
    except FileNotFoundError:
        raise ValueError(f"images: {path} does not exist") from None
    except ValueError as e:  # a FIFO, a device, ...: never read
        raise ValueError(f"images: {e}") from None
    try:
        with file, Image.open(file) as image:
            image.load()  # decode now: a truncated file fails here, naming the file
            return image.copy()
    except Image.DecompressionBombError as e:
        raise ValueError(f"images: {path} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"images: cannot read {path} as an image ({e})") from None


def list_images(sources: Iterable[str | os.PathLike]) -> list[str]:
    """Image files named by ``sources``: files as given, folders walked (sorted, recursively)
    for regular files with an image extension (``IMAGE_EXTENSIONS``; hidden files skipped, and
    FIFOs, sockets and devices skipped with a warning on the ``fastprompt.serve`` logger)."""
    paths = []
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            found, odd = [], []
            for root, dirs, files in os.walk(source):
                dirs.sort()
                for f in files:
                    if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):
                        path = os.path.join(root, f)
                        problem = regular_file_problem(path)
                        if problem is None:
                            found.append(path)
                        else:
                            odd.append(f"{path!r} {problem}")
            if odd:
                logger.warning("fastprompt: skipped %d file(s) named like images in %r: %s%s",
                               len(odd), source, ", ".join(sorted(odd)[:5]),
                               ", ..." if len(odd) > 5 else "")
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
