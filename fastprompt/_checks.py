"""Argument checks and names shared by every layer, serving included (no torch): one integer
check, one seed check with the one seed range, one check of class names (every source of them:
class folders, split files, ``--classnames`` files, task files, exports), one way to turn a
label into a file-name part, one way to show untrusted text on a terminal, and the error of a
result refused by its own verification."""
from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence


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


# Line and paragraph separators (Zl, Zp) split lines as newlines do (``str.splitlines``).
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_BOM = "\ufeff"


def shown(text: str, limit: int = 60) -> str:
    """``repr(text)``, cut after ``limit`` characters (with the full length) for messages."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def _describe(char: str) -> str:
    name = unicodedata.name(char, "") or unicodedata.category(char)
    kind = ", a line break" if char in _LINE_BREAKS else ""
    return f"{char!r} (U+{ord(char):04X} {name}{kind})"


def check_class_name(name, where: str, what: str = "class name") -> str:
    """``name`` as fastprompt keeps a class (or task) name: a leading byte-order mark dropped,
    Unicode NFC, surrounding white space stripped. TypeError or ValueError naming ``where`` and
    ``what`` when it is not a string, is empty, or holds a character of Unicode category C or a
    line separator: control characters (newline, tab, NUL, ESC), format characters (U+202E
    RIGHT-TO-LEFT OVERRIDE, zero-width ones, a byte-order mark inside the name), private-use,
    surrogate and unassigned code points. Such characters act on terminals, forge lines in
    ``labels.txt`` or output, or make a name display as another; every source of class names
    (class folders, split files, ``--classnames``, task files, exports) is checked here."""
    if not isinstance(name, str):
        raise TypeError(f"{where}: {what} {name!r:.80} is not a string")
    text = unicodedata.normalize("NFC", name[1:] if name.startswith(_BOM) else name)
    bad = sorted({c for c in text if unicodedata.category(c).startswith("C")
                  or c in _LINE_BREAKS})
    if bad:
        raise ValueError(f"{where}: {what} {shown(name)} contains the control character(s) "
                         f"{', '.join(_describe(c) for c in bad[:5])}; rename it")
    text = text.strip()
    if not text:
        raise ValueError(f"{where}: {what} {shown(name)} is empty")
    return text


def check_class_names(names, where: str, what: str = "entry") -> list[str]:
    """Every name through ``check_class_name`` (``what`` and the 1-based index name a bad one)
    and the results distinct (after NFC: the NFD and NFC spellings of a name are one name);
    returns them. TypeError when ``names`` is not a list or tuple."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"{where}: expected a list of class names, got {type(names).__name__}")
    checked = [check_class_name(n, where, f"{what} {i + 1}") for i, n in enumerate(names)]
    duplicates = sorted({n for n in checked if checked.count(n) > 1})
    if duplicates:
        raise ValueError(f"{where}: {duplicates} appear more than once")
    return checked


def printable(text: str) -> str:
    """``text`` safe to show on a terminal: every character that is not printable (control
    characters such as ESC and newline, format characters such as U+202E, line separators,
    surrogates of undecodable file-name bytes, ...) written as its Python escape (``\\x1b``,
    ``\\n``, ``\\u202e``); printable text, the space included, is left as it is. For human
    output of untrusted names (class names of a model file, image file names)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
