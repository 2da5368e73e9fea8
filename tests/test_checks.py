"""``fastprompt._checks``: the one check of class names (every source of them goes through it)
and the one way untrusted text is shown on a terminal (issue 23, items 3 and 4)."""
from __future__ import annotations

import unicodedata

import pytest

from fastprompt._checks import check_class_name, check_class_names, printable


@pytest.mark.parametrize("name, shown", [
    ("cat\u202egnp.exe", "U+202E RIGHT-TO-LEFT OVERRIDE"),
    ("zero\u200bwidth", "U+200B ZERO WIDTH SPACE"),
    ("a\tb", "U+0009"), ("nul\x00", "U+0000"), ("esc\x1b[2J", "U+001B"),
    ("two\nlines", "a line break"), ("two\u2028lines", "U+2028 LINE SEPARATOR, a line break"),
    ("bom\ufeffinside", "U+FEFF"), ("private\ue000", "U+E000"), ("unassigned\U000e0fff", "U+E0FFF"),
    ("surrogate\udcff", "U+DCFF"),
])
def test_category_c_characters_are_refused_by_name(name, shown):
    with pytest.raises(ValueError, match=r"^--classnames: f\.txt: line 3 .* contains the control "
                                         r"character\(s\) .*; rename it$") as e:
        check_class_name(name, "--classnames: f.txt", "line 3")
    assert shown in str(e.value)


def test_names_are_nfc_stripped_without_a_bom():
    nfd = unicodedata.normalize("NFD", "crème brûlée")
    assert check_class_name(f"\ufeff  {nfd} ", "w") == "crème brûlée"
    assert check_class_name("猫 and ñ", "w") == "猫 and ñ"
    for empty in ("", "   ", "\ufeff"):
        with pytest.raises(ValueError, match="^w: class name .* is empty"):
            check_class_name(empty, "w")
    with pytest.raises(TypeError, match="^w: class name 3 is not a string"):
        check_class_name(3, "w")
    long = check_class_name("x" * 5000, "w")
    assert long == "x" * 5000
    with pytest.raises(ValueError) as e:
        check_class_name("x" * 5000 + "\x1b", "w")
    assert len(str(e.value)) < 300 and "5001 characters" in str(e.value)


def test_lists_are_checked_entry_by_entry_and_distinct_after_nfc():
    assert check_class_names(["a", " b "], "w") == ["a", "b"]
    with pytest.raises(ValueError, match=r"^w: entry 2 'b\\x1b' contains"):
        check_class_names(["a", "b\x1b"], "w")
    with pytest.raises(ValueError, match=r"^w: \['café'\] appear more than once"):
        check_class_names(["caf\u00e9", "cafe\u0301"], "w")
    with pytest.raises(TypeError, match="^w: expected a list"):
        check_class_names("ab", "w")


def test_printable_escapes_what_would_act_on_a_terminal():
    assert printable("plain text, ünïcode 猫 and spaces") == "plain text, ünïcode 猫 and spaces"
    assert printable("x\x1b[2J\ny\r\u202ez\udcff\u200b\t") == \
        "x\\x1b[2J\\ny\\r\\u202ez\\udcff\\u200b\\t"
    assert printable("a\x1b").isprintable()
