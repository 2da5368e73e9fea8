"""Reading a torch checkpoint written by other code without importing or running anything named
in it: ``read_torch_file(path)``.

A file that ``torch.save`` wrote is a zip archive: ``<name>/data.pkl``, a pickle whose tensors
refer by key to raw storage records ``<name>/data/<key>``. A pickle names the classes and
functions that rebuild its objects, and ``pickle.load`` imports and calls them: a file can run
any code that way (``os.system``, ``eval``). ``torch.load(weights_only=True)`` refuses every name
outside its allowlist, so it refuses the checkpoints of training frameworks such as Dassl, which
also pickle their optimiser and scheduler objects (``dassl.optim.lr_scheduler`` classes, not
installed here).

This reader builds such files with a restricted unpickler; its rules:

* The archive: exactly one ``*/data.pkl``; every record this reader reads (the pickle, the
  storages) stored uncompressed, as ``torch.save`` writes them (so its size is bounded by the
  file's: no decompression bombs); ``byteorder``, where present, ``little``.
* Names a pickle may use, and what they give: ``collections.OrderedDict``; the storage types
  ``torch.<Type>Storage`` (as markers of a dtype, inside storage references only); the tensor
  rebuilders ``torch._utils._rebuild_tensor{,_v2}`` and ``_rebuild_parameter{,_with_state}``,
  replaced by this module's own functions that make a plain, detached CPU tensor from a storage
  read here (offset, size and stride checked against the storage, and no more elements than it
  holds beyond ``MAX_VIEW_ELEMENTS``; ``requires_grad``, hooks and metadata dropped);
  ``torch.Size``, ``torch.device``, torch dtypes; ``builtins`` ``set``, ``frozenset``,
  ``complex``, ``slice``, ``bytearray``; and ``_codecs.encode`` of text as latin-1 (how protocol
  2 stores ``bytes``).
* Any other name — a class, a function, ``os.system``, ``builtins.eval``, torch's own optimiser
  and scheduler classes — is neither imported nor called: it is replaced by an ``Opaque``
  subclass that records its name, and calling it, instantiating it, or setting its state or items
  only stores what was passed. The loaded data holds these inert stand-ins where the objects
  would be.
* Storage references (pickle persistent ids) must be ``("storage", <storage type>, key, location,
  numel)`` naming a record of exactly ``numel`` elements; the location (``cuda:0``) is ignored:
  everything is built on the CPU.

Anything else (not a zip archive, a truncated or damaged one, a broken pickle, a reference to a
missing record) raises ``ValueError`` naming the file.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
import zipfile
from collections import OrderedDict

import torch

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)}
# The pickle itself is metadata (names, shapes, hyper-parameters): far below this.
MAX_PICKLE_BYTES = 256 * 2**20
# Tensors are copied out of their storage: one with more elements than its storage (repeated
# through zero strides, as expand makes them) is refused beyond this many.
MAX_VIEW_ELEMENTS = 2**20


class Opaque:
    """Stands in for an object whose class or constructor a file names but that was not
    imported or called. ``global_name`` is the name (``module.qualname``); ``args``, ``kwargs``,
    ``state`` and ``items`` hold what the file passed to it, itself built by the same rules."""
    global_name = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "items", [])
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value) -> None:
        self.items.append((key, value))

    def append(self, value) -> None:
        self.items.append(value)

    def extend(self, values) -> None:
        self.items.extend(values)

    def __call__(self, *args, **kwargs) -> "Opaque":
        result = type(self).__new__(type(self), *args, **kwargs)
        object.__setattr__(result, "state", ("called", self))
        return result

    def __repr__(self) -> str:
        return f"<not loaded: {self.global_name}>"


class _StorageKind:
    """A storage type named in the file: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _Storage:
    """A storage record read from the archive: a flat tensor of its elements."""

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _check_shape(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"tensor {what} {values!r} is not a tuple of ints >= 0")
    return values


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> torch.Tensor:
    """A tensor of ``storage`` (offset, size and stride checked), as a detached CPU copy; the
    file's ``requires_grad``, hooks and metadata are dropped."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor refers to something that is not a storage")
    size, stride = _check_shape(tuple(size), "size"), _check_shape(tuple(stride), "stride")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or \
            len(size) != len(stride):
        raise pickle.UnpicklingError("tensor offset, size and stride do not fit together")
    numel = storage.flat.numel()
    if all(n > 0 for n in size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= numel:
            raise pickle.UnpicklingError(f"a tensor of size {size} reaches element {last} of a "
                                         f"storage of {numel}")
    elif offset > numel:
        raise pickle.UnpicklingError("a tensor starts past the end of its storage")
    elements = 1
    for n in size:
        elements *= n
    if elements > max(numel, MAX_VIEW_ELEMENTS):  # stride-0 views: copied, they could be huge
        raise pickle.UnpicklingError(f"a tensor of size {size} repeats the {numel} elements of "
                                     "its storage")
    return storage.flat.as_strided(size, stride, offset).clone(
        memory_format=torch.contiguous_format)


def _rebuild_parameter(data, *_ignored) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("a parameter's data is not a tensor")
    return data


def _encode(text, encoding="latin1", *_ignored) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed for latin-1 text only")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): _encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` under the module docstring's rules; storages come from
    ``read_storage(kind, key, numel)``."""

    def __init__(self, file, read_storage):
        super().__init__(file)
        self._read_storage = read_storage
        self._stand_ins: dict[str, type] = {}

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise pickle.UnpicklingError("a global name that is not a string")
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPES:
            return _DTYPES[name]
        full = f"{module}.{name}"
        if full not in self._stand_ins:  # a type: NEWOBJ needs one
            self._stand_ins[full] = type("Opaque", (Opaque,), {"global_name": full})
        return self._stand_ins[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {str(pid)[:80]}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(kind, _StorageKind) or not isinstance(key, str) or \
                not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"malformed storage reference {str(pid)[:80]}")
        return self._read_storage(kind.dtype, key, numel)


def _stored_record(archive: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise pickle.UnpicklingError(f"record {name!r} is missing") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise pickle.UnpicklingError(f"record {name!r} is compressed (torch.save stores records "
                                     "uncompressed)")
    return info


def _load_archive(archive: zipfile.ZipFile):
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise pickle.UnpicklingError("no single <name>/data.pkl record: not a torch.save file")
    prefix = pickles[0][:-len("data.pkl")]
    if prefix + "byteorder" in archive.namelist():
        order = archive.read(_stored_record(archive, prefix + "byteorder").filename)
        if order.strip() != b"little":
            raise pickle.UnpicklingError(f"byte order {order[:10]!r} is not supported")
    info = _stored_record(archive, pickles[0])
    if info.file_size > MAX_PICKLE_BYTES:
        raise pickle.UnpicklingError(f"its pickle is {info.file_size} bytes, more than a "
                                     "checkpoint's metadata takes")
    storages: dict[str, _Storage] = {}

    def read_storage(dtype: torch.dtype, key: str, numel: int) -> _Storage:
        if key not in storages:
            record = _stored_record(archive, f"{prefix}data/{key}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            if record.file_size != numel * itemsize:
                raise pickle.UnpicklingError(f"storage {key!r} holds {record.file_size} bytes, "
                                             f"not {numel} x {itemsize}")
            data = bytearray(archive.read(record.filename))
            flat = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            storages[key] = _Storage(flat)
        storage = storages[key]
        if storage.flat.dtype != dtype or storage.flat.numel() != numel:
            raise pickle.UnpicklingError(f"storage {key!r} is referred to with two types")
        return storage

    return _RestrictedUnpickler(io.BytesIO(archive.read(info.filename)), read_storage).load()


def read_torch_file(path, what: str = "checkpoint"):
    """The object ``torch.save`` wrote to ``path``, built under the module docstring's rules:
    plain containers, numbers, strings and CPU tensors, with ``Opaque`` stand-ins for any other
    object. ``ValueError`` naming ``what`` and the file when it cannot be read that way."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {path!r} is not a file")
    try:
        with zipfile.ZipFile(path) as archive:
            return _load_archive(archive)
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as e:
        raise ValueError(f"{what}: {path!r} is damaged or not a torch checkpoint (not a zip "
                         f"archive as torch.save writes: {e}; files saved by torch < 1.6 or with "
                         "_use_new_zipfile_serialization=False are not read)") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError,
            IndexError, OverflowError, RuntimeError, MemoryError, RecursionError,
            UnicodeDecodeError, zipfile.error, OSError) as e:
        raise ValueError(f"{what}: {path!r} is damaged or not a torch checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]})") from e
