"""Argument checks and names shared by every layer, serving included (no torch): one integer
check, one seed check with the one seed range, one way to turn a label into a file-name part,
and the error of a result refused by its own verification."""
from __future__ import annotations

import re


class CheckFailed(RuntimeError):
    """The work was done, but its own verification refused the result (an export that disagrees
    with torch, a reduced-precision model below the agreement bound): the command exits with 1,
    not with bad input's 2."""


def check_int(name: str, value, low: int) -> int:
    """``value``, an int (not a bool) >= ``low``; TypeError or ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


# Every seed is an int in [0, SEED_LIMIT): what every use of one takes. The training streams
# seed torch generators with ``seed * 2_000_003 + epoch`` (int64), numpy's generators refuse
# negative seeds, and seeds that fastprompt draws itself (export verification, tests) are 4
# random bytes, so every drawn seed can be given back.
SEED_LIMIT = 2**32
SEED_RANGE = "[0, 2**32)"


def check_seed(seed, name: str = "seed") -> int:
    """``seed``, an int (not a bool) in ``[0, 2**32)``; TypeError or ValueError naming ``name``
    otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int in {SEED_RANGE}, got {type(seed).__name__} "
                        f"{seed!r:.40}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}: expected an int in {SEED_RANGE}, got {seed!r:.40}")
    return seed


def slug(text: str, *, keep: str = "", lower: bool = False, max_length: int | None = None,
         default: str = "") -> str:
    """``text`` as a file-name part: every run of characters other than ASCII letters, digits
    and ``keep`` becomes one ``-`` (none at either end), lower-cased with ``lower``, cut to
    ``max_length``; ``default`` when nothing is left. Names already on disk (sweep runs,
    evaluation caches) depend on each caller's options, so they are the callers' to keep."""
    if lower:
        text = text.lower()
    out = re.sub(f"[^A-Za-z0-9{re.escape(keep)}]+", "-", text).strip("-")
    if max_length is not None:
        out = out[:max_length]
    return out or default
