"""``fastprompt.train.transfer``'s class-name files: ``--classnames`` is checked as every other
source of class names is (issue 23, item 4)."""
from __future__ import annotations

import pytest

from fastprompt.train.transfer import check_classnames, read_classnames_file


def test_classnames_file_bom_blank_lines_and_crlf(tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes("\ufeffcat\r\n\r\n  hot dog  \r\ncafe\u0301\n".encode("utf-8"))
    assert read_classnames_file(path) == ["cat", "hot dog", "café"]


@pytest.mark.parametrize("line", ["cat\u202egnp.exe", "zero\u200bwidth", "tab\there", "nul\x00",
                                  "esc\x1b[31m", "sep\u2028arated", "mid\ufeffbom"])
def test_classnames_file_refuses_hostile_names_by_line(tmp_path, line):
    path = tmp_path / "names.txt"
    path.write_text(f"dog\n\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"^--classnames: {path}: line 3 .* contains the "
                                         "control character"):
        read_classnames_file(path)


def test_classnames_file_duplicates_after_nfc(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("caf\u00e9\ncafe\u0301\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"appear more than once"):
        read_classnames_file(path)
    with pytest.raises(ValueError, match="at least 2"):
        check_classnames(["one"])
