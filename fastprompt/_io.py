"""Safe file placement for everything fastprompt writes (caches, checkpoints, prompts, metrics,
ONNX models, Triton configs). Needs no torch: serving imports it too.

* Atomic: a file goes to a temporary name in the target folder and is renamed into place, so a
  reader sees the old file or the new one, never a half-written one. The temporary file gets the
  permissions ``open()`` would give (``0o666`` less the umask), not ``mkstemp``'s 0600, so a
  server running as another user can read what was exported for it.
* Stale temporary files: a writer holds an ``flock`` on its temporary file while writing; a
  killed writer's lock is released by the kernel, so the next write to the same target removes
  the temporaries nobody holds.
* Locks: ``exclusive_lock`` (an ``flock`` on a lock file that names the holder's pid) keeps two
  processes from writing one run folder or one cache at the same time.
* Strict JSON: ``write_json_atomic`` writes ``null`` for NaN and infinities (RFC 8259 has neither).
* ``IMAGE_EXTENSIONS``: the file names read as images, for data sets and serving alike; only
  regular files are images (``regular_file_problem``, ``open_regular_file``): a FIFO, socket or
  device named ``x.jpg`` would block the reader or never end, so it is skipped or refused.
* Progress, the one display: ``progress_bar`` is a tqdm bar on a terminal and plain log lines
  (``Progress``) elsewhere (CI logs, scripts), so a long step never looks hung; ``Progress`` with
  ``rate`` is predict's images-per-second count, redrawn on a terminal (serving has no tqdm).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from typing import Callable, Iterator

# File names read as images, by data-set readers and by ``fastprompt predict`` on folders alike.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                    ".pgm")


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a file")


def regular_file_problem(path) -> str | None:
    """Why ``path`` cannot be read as a file's content (symbolic links followed), worded to
    follow the path: ``"is a FIFO, not a regular file"`` (or a socket, device, folder),
    ``"does not exist"``, ``"cannot be read (...)"``; None for a regular file. Opening a FIFO
    blocks until a writer comes and a device may never end, so only regular files are images,
    for data sets and serving alike."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None if stat.S_ISREG(mode) else f"is {_kind(mode)}, not a regular file"


def open_regular_file(path):
    """``path`` opened for binary reading if it is a regular file, else ``ValueError`` naming it
    and what it is (``FileNotFoundError`` when it does not exist). The check is made on the
    opened file, so nothing can be swapped in between, and the file is opened without blocking:
    a FIFO is refused at once instead of waiting for a writer."""
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:  # a socket (ENXIO), no permission, ...
        raise ValueError(f"{path!r} {regular_file_problem(path) or f'cannot be read ({e})'}"
                         ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ValueError(f"{path!r} is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class LockedError(RuntimeError):
    """Another live process holds the lock; the message names it and its pid."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_pattern(final: str) -> tuple[str, str, str]:
    folder = os.path.dirname(os.path.abspath(final))
    return folder, "." + os.path.basename(final) + ".", ".tmp"


def remove_stale_temporaries(final: str) -> list[str]:
    """Remove the temporary files of ``final`` left by killed writers (those no process holds
    a lock on); returns their paths."""
    folder, prefix, suffix = _temp_pattern(final)
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*" + suffix)):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer holds it
            os.close(fd)
            continue
        try:
            os.remove(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds, flush it to disk and
    rename it to ``path``; when it fails, remove it. A system error that names no file, or the
    temporary one (a full disk, a file-size limit), is raised naming ``path``: the file that
    could not be written."""
    path = os.fspath(path)
    folder, prefix, suffix = _temp_pattern(path)
    os.makedirs(folder, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # marks it live for remove_stale_temporaries
        os.fchmod(fd, 0o666 & ~_umask())
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        remove_if_present(tmp)
        if e.strerror and e.filename in (None, tmp):
            raise OSError(e.errno, e.strerror, path) from e
        raise
    except BaseException:
        remove_if_present(tmp)
        raise
    finally:
        os.close(fd)


def atomic_write(path: str, writer: Callable) -> None:
    """``writer(f)`` into a binary file object; the result lands at ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer(f)


def write_text_atomic(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def json_safe(obj):
    """``obj`` with every NaN or infinite float replaced by None (JSON's ``null``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj, **kwargs) -> str:
    """Strict JSON (RFC 8259): non-finite floats become ``null``."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, dumps_json(obj, indent=2) + "\n")


def read_json(path: str, what: str):
    """The JSON value in ``path``; ValueError naming ``what`` and the file when it is unreadable
    as JSON (truncated, not UTF-8, nested too deeply)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{what}: {path!r} is not valid JSON ({type(e).__name__}: "
                         f"{str(e)[:200] or 'nested too deeply'})") from e


@contextlib.contextmanager
def exclusive_lock(lock_path: str, what: str, *, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block; when another
    process holds it, raise ``LockedError`` naming ``what`` and that process's pid. The lock dies
    with its process, so a killed holder never blocks the next one. ``remove``: delete the lock
    file when done (for a lock beside a file rather than inside a folder of its own)."""
    lock_path = os.fspath(lock_path)
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise LockedError(f"{what} is in use by another fastprompt process (pid {holder}, "
                              f"lock {lock_path}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        try:
            yield
        finally:
            if remove:
                remove_if_present(lock_path)
    finally:
        os.close(fd)


def place_alias(source: str, path: str) -> str:
    """Make ``path`` hold the same bytes as ``source``: a hard link, or a copy where the file
    system refuses links. Returns ``"hardlink"`` or ``"copy"``.

    Hard links rather than symlinks: both names are ordinary files, so a model repository
    survives being copied, archived or mounted into a container on its own, and replacing one
    name later never leaves the other dangling.
    """
    folder, prefix, suffix = _temp_pattern(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.close(fd)
    os.remove(tmp)  # os.link needs a free name; mkstemp only reserved a unique one
    try:
        try:
            os.link(source, tmp)
            mode = "hardlink"
        except OSError:
            shutil.copyfile(source, tmp)
            mode = "copy"
        os.replace(tmp, path)
    except BaseException:
        remove_if_present(tmp)
        raise
    return mode


def remove_if_present(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# Off a terminal: a plain line at most every this many seconds (and the last one).
PROGRESS_LINE_SECONDS = 10.0
# On a terminal, the one line redrawn in place: at most this often.
PROGRESS_REDRAW_SECONDS = 0.2


class Progress:
    """Progress of ``total`` items on stderr without tqdm (serving has no tqdm), with tqdm's
    ``update``/``set_postfix`` interface; use it as a context manager.

    Off a terminal it prints plain lines, at most one every ``PROGRESS_LINE_SECONDS``, so the
    log of a long step shows that work goes on; with ``redraw`` (a terminal) it rewrites one line
    in place, at most every ``PROGRESS_REDRAW_SECONDS``. The last state is shown when the
    ``with`` block ends without an error (a redrawn line is ended either way).

    Two formats: ``desc: n/total unit (p%), t s[, postfix]``, with a first line at the start
    (training, caching); with ``rate`` (the rate's unit, e.g. ``"img/s"``),
    ``desc: n/total unit (r img/s)`` and no first line, a rate needing items done (predict).
    ``enabled=False`` shows nothing.
    """

    def __init__(self, total: int, desc: str, unit: str = "img", initial: int = 0, *,
                 rate: str | None = None, redraw: bool = False, enabled: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.rate, self.redraw, self.enabled = rate, redraw, enabled
        self.interval = PROGRESS_REDRAW_SECONDS if redraw else PROGRESS_LINE_SECONDS
        self.start = self.last = time.monotonic()
        self.postfix = ""
        self._line_open = False  # a redrawn line that has no newline yet
        if rate is None:
            self._show()

    def _text(self) -> str:
        elapsed = time.monotonic() - self.start
        if self.rate is not None:
            return (f"{self.desc}: {self.n}/{self.total} {self.unit} "
                    f"({self.n / max(elapsed, 1e-9):.1f} {self.rate})")
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        return f"{self.desc}: {self.n}/{self.total} {self.unit}{pct}, {elapsed:.1f} s{self.postfix}"

    def _show(self, final: bool = False) -> None:
        if self.enabled:
            if self.redraw:
                print(f"\r{self._text()}", end="\n" if final else "", file=sys.stderr, flush=True)
                self._line_open = not final
            else:
                print(self._text(), file=sys.stderr, flush=True)
        self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._show()

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self._show(final=True)
        elif self._line_open:  # an error message follows: start it on a line of its own
            print(file=sys.stderr, flush=True)


def progress_bar(total: int, desc: str, progress: bool | None, *, unit: str = "img",
                 initial: int = 0):
    """A progress display for ``total`` items: a tqdm bar when stderr is a terminal, else
    ``Progress`` lines (start, every ``PROGRESS_LINE_SECONDS``, end); ``progress=False`` shows
    nothing, ``True`` forces the bar."""
    if progress is None and not sys.stderr.isatty():
        return Progress(total, desc, unit, initial)
    # Imported here: serving imports this module and has no tqdm.
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=progress is False,
                dynamic_ncols=True)
