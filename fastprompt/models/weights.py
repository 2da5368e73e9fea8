"""The identity of a model's weights: a hash of its image tower, which alone decides the cached
image features, so a feature cache and a trained run can refuse a model with other weights.

Hashing reads every weight (about a second per GB on CPU), so for a model loaded from a file the
hash is remembered by the file's path, size and modification time (``$FASTPROMPT_CACHE_DIR`` or
``~/.cache/fastprompt``).
"""
from __future__ import annotations

import json
import os

import torch

from fastprompt._hashing import new_digest, update_tensor_hash
from fastprompt._io import write_json_atomic

WEIGHTS_SOURCE_ATTR = "_fastprompt_weights_source"
# Set on a model created without its image tower: the full model's hash, computed before.
WEIGHTS_HASH_ATTR = "_fastprompt_weights_hash"


def _hash_memo_path() -> str:
    base = os.environ.get("FASTPROMPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastprompt")
    return os.path.join(base, "weights-hashes.json")


def _read_memo() -> dict:
    try:
        with open(_hash_memo_path(), encoding="utf-8") as f:
            memo = json.load(f)
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def remembered_weights_hash(model: torch.nn.Module) -> str | None:
    """``model_weights_hash(model)`` when it is known without hashing: set on a model created
    without its image tower, or remembered for the file the model was loaded from; else None."""
    digest = getattr(model, WEIGHTS_HASH_ATTR, None)
    if digest is not None:
        return digest
    source = getattr(model, WEIGHTS_SOURCE_ATTR, None)
    if source is None:
        return None
    known = _read_memo().get(json.dumps(source))
    return known if isinstance(known, str) else None


def model_weights_hash(model: torch.nn.Module) -> str:
    """BLAKE2b of the image tower's state (every tensor's name, dtype, shape and bytes).

    Only ``model.visual`` (the whole model when it has none) is hashed: it alone determines the
    image features. About a second per GB of weights, on CPU; so for a model that
    ``fastprompt.models.create_model`` loaded from a file, the hash is remembered (in
    ``$FASTPROMPT_CACHE_DIR`` or ``~/.cache/fastprompt``) by the file's path, size and
    modification time, the model name and the precision, and computed again only when one of
    those changes. (Such a model is frozen; changing its weights in place is not noticed.)
    """
    known = remembered_weights_hash(model)
    if known is not None:
        return known
    source = getattr(model, WEIGHTS_SOURCE_ATTR, None)
    key = json.dumps(source) if source is not None else None
    tower = getattr(model, "visual", model)
    h = new_digest()
    for name, t in sorted(tower.state_dict().items()):
        update_tensor_hash(h, name, t)
    digest = h.hexdigest()
    if key is not None:
        memo = _read_memo()
        memo[key] = digest
        try:  # a memo only: an unwritable cache folder costs the next call a second, no more
            write_json_atomic(_hash_memo_path(), memo)
        except OSError:
            pass
    return digest
