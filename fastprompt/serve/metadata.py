"""The metadata a fastprompt ONNX classifier carries, and a fast reader for it.

Written by the export (``fastprompt.export`` imports ``ModelInfo`` and ``PREFIX`` from here) and
read by serving; it lives in the torch-free serving package so that serving never imports export.

Every key is prefixed ``fastprompt.`` and every value is a string (ONNX ``metadata_props``);
structured values are JSON. ``fastprompt.format_version`` changes whenever a key is renamed or its
meaning changes, so a reader can refuse files it does not understand instead of misreading them.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, field

PREFIX = "fastprompt."
FORMAT_VERSION = 1
INPUT_KINDS = ("image", "features")
PRECISIONS = ("float32", "float16", "int8")


@dataclass(frozen=True)
class ModelInfo:
    """What a fastprompt ONNX classifier says about itself.

    ``input_kind`` is ``"image"`` for the full classifier (input ``image``, N x 3 x H x W,
    preprocessed) and ``"features"`` for a head-only graph (input ``image_features``, N x D).
    The preprocessing fields describe the image tower's expected input (open_clip's preprocess
    config); a head-only graph exported without its model has none.
    """

    class_names: list[str]
    scale: float
    input_kind: str
    embed_dim: int
    model_name: str
    precision: str = "float32"
    method: dict = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str | None = None
    resize_mode: str | None = None
    fill_color: int | None = None
    fastprompt_version: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def input_name(self) -> str:
        return "image" if self.input_kind == "image" else "image_features"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` entries (all strings)."""
        props = {
            "format_version": str(self.format_version),
            "class_names": json.dumps(list(self.class_names), ensure_ascii=False),
            "scale": repr(float(self.scale)),
            "input_kind": self.input_kind,
            "embed_dim": str(self.embed_dim),
            "model_name": self.model_name,
            "precision": self.precision,
            "method": json.dumps(self.method, sort_keys=True),
            "fastprompt_version": self.fastprompt_version,
        }
        if self.image_size is not None:
            props.update({
                "image_size": json.dumps(list(self.image_size)),
                "mean": json.dumps(list(self.mean)),
                "std": json.dumps(list(self.std)),
                "interpolation": self.interpolation,
                "resize_mode": self.resize_mode,
                "fill_color": str(self.fill_color),
            })
        return {PREFIX + k: v for k, v in props.items()}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str) -> "ModelInfo":
        """Parse ``metadata_props``; ``source`` (a path) names the file in every error."""
        ours = {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}
        if "format_version" not in ours:
            raise ValueError(f"model: {source} is an ONNX model but not a fastprompt classifier "
                             "(no fastprompt metadata); export one with `fastprompt export`")
        try:
            version = int(ours["format_version"])
        except ValueError:
            raise ValueError(f"model: {source} has a malformed fastprompt.format_version "
                             f"{ours['format_version']!r}") from None
        if version != FORMAT_VERSION:
            raise ValueError(f"model: {source} uses fastprompt metadata format {version}; this "
                             f"fastprompt reads format {FORMAT_VERSION} (export it again)")
        try:
            info = cls(
                class_names=json.loads(ours["class_names"]),
                scale=float(ours["scale"]),
                input_kind=ours["input_kind"],
                embed_dim=int(ours["embed_dim"]),
                model_name=ours["model_name"],
                precision=ours["precision"],
                method=json.loads(ours["method"]),
                image_size=_tuple(ours, "image_size", int),
                mean=_tuple(ours, "mean", float),
                std=_tuple(ours, "std", float),
                interpolation=ours.get("interpolation"),
                resize_mode=ours.get("resize_mode"),
                fill_color=int(ours["fill_color"]) if "fill_color" in ours else None,
                fastprompt_version=ours.get("fastprompt_version", ""),
                format_version=version,
            )
        except (KeyError, ValueError, TypeError) as e:
            missing = f"missing key fastprompt.{e.args[0]}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"model: {source} has damaged fastprompt metadata ({missing})") from None
        problems = []
        if not (isinstance(info.class_names, list) and info.class_names
                and all(isinstance(c, str) for c in info.class_names)):
            problems.append("class_names is not a non-empty list of strings")
        if info.input_kind not in INPUT_KINDS:
            problems.append(f"input_kind {info.input_kind!r} is not one of {INPUT_KINDS}")
        if info.precision not in PRECISIONS:
            problems.append(f"precision {info.precision!r} is not one of {PRECISIONS}")
        if not math.isfinite(info.scale):
            problems.append("scale is not finite")
        if info.input_kind == "image" and info.image_size is None:
            problems.append("an image classifier without image_size")
        if info.embed_dim < 1:
            problems.append(f"embed_dim {info.embed_dim} is not positive")
        if info.image_size is not None and (len(info.image_size) != 2 or min(info.image_size) < 1):
            problems.append(f"image_size {list(info.image_size)} is not two positive sizes "
                            "(height, width)")
        for key in ("mean", "std"):
            values = getattr(info, key)
            if values is None:
                if info.image_size is not None:
                    problems.append(f"image_size without {key}")
            elif len(values) != 3 or not all(map(math.isfinite, values)):
                problems.append(f"{key} {list(values)} is not three finite numbers (R, G, B)")
        if info.std is not None and len(info.std) == 3 and 0.0 in info.std:
            problems.append(f"std {list(info.std)} holds a zero")
        if problems:
            raise ValueError(f"model: {source} has damaged fastprompt metadata: " + "; ".join(problems))
        return info


def _tuple(props: dict[str, str], key: str, cast) -> tuple | None:
    if key not in props:
        return None
    values = json.loads(props[key])
    if not isinstance(values, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool)
            and (cast is float or float(v).is_integer()) for v in values):
        raise ValueError(f"{key} {props[key]:.80} is not a list of "
                         f"{'integers' if cast is int else 'numbers'}")
    return tuple(cast(v) for v in values)


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """``metadata_props`` of an ONNX file, read without parsing its graph.

    The metadata sits after the graph in the file; walking the top-level protobuf fields and
    seeking past the graph costs a few reads instead of parsing hundreds of megabytes (``onnx.load``
    of ViT-B-32 takes about a second). Raises ``ValueError`` naming the file when it is not a
    well-formed ONNX model at the top level.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    props: dict[str, str] = {}
    seen = set()
    with open(path, "rb") as f:
        while f.tell() < size:
            tag = _read_varint(f, path)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                raise _not_onnx(path, "field number 0")
            seen.add(number)
            if wire_type == 0:
                _read_varint(f, path)
            elif wire_type == 1:
                f.seek(8, os.SEEK_CUR)
            elif wire_type == 5:
                f.seek(4, os.SEEK_CUR)
            elif wire_type == 2:
                length = _read_varint(f, path)
                if f.tell() + length > size:
                    raise _not_onnx(path, "truncated (a field runs past the end of the file)")
                if number == 14:  # ModelProto.metadata_props
                    key, value = _parse_string_pair(f.read(length), path)
                    props[key] = value
                else:
                    f.seek(length, os.SEEK_CUR)
            else:
                raise _not_onnx(path, f"invalid protobuf wire type {wire_type}")
        if f.tell() != size:
            raise _not_onnx(path, "truncated")
    if 1 not in seen or 7 not in seen:  # ir_version and graph are required
        raise _not_onnx(path, "no ir_version or graph")
    return props


def _not_onnx(path: str, why: str) -> ValueError:
    return ValueError(f"model: {path} is not a readable ONNX model ({why}); the file is damaged "
                      "or was not written by an ONNX exporter")


def _read_varint(f, path: str) -> int:
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise _not_onnx(path, "truncated")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise _not_onnx(path, "malformed varint")


def _parse_string_pair(buf: bytes, path: str) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (key = field 1, value = field 2)."""
    f, fields = io.BytesIO(buf), {1: "", 2: ""}
    while f.tell() < len(buf):
        tag = _read_varint(f, path)
        if tag & 7 != 2:
            raise _not_onnx(path, "malformed metadata entry")
        length = _read_varint(f, path)
        data = f.read(length)
        if len(data) != length:
            raise _not_onnx(path, "truncated metadata entry")
        try:
            fields[tag >> 3] = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _not_onnx(path, "metadata is not UTF-8") from None
    return fields[1], fields[2]
