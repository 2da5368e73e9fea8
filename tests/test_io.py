"""``fastprompt._io``: what a failed atomic write says (issue 23, item 12) and the regular-file
check every image reader uses (item 2)."""
from __future__ import annotations

import errno
import os
import socket

import pytest

from fastprompt._io import atomic_write, open_regular_file, regular_file_problem


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_failed_write_names_the_target_not_the_temporary(tmp_path, code):
    target = tmp_path / "metrics.json"

    def full(f):
        f.write(b"{")
        raise OSError(code, os.strerror(code))
    with pytest.raises(OSError) as e:
        atomic_write(str(target), full)
    assert e.value.errno == code and e.value.filename == str(target)
    assert os.listdir(tmp_path) == []
    # An error that names another file keeps it; one of fastprompt's own words is kept whole.
    with pytest.raises(FileNotFoundError) as e:
        atomic_write(str(target), lambda f: open(tmp_path / "other", "rb"))
    assert e.value.filename == str(tmp_path / "other")
    with pytest.raises(OSError, match="^cannot write the feature cache"):
        atomic_write(str(target), lambda f: (_ for _ in ()).throw(
            OSError("cannot write the feature cache 'x': disk full")))
    assert os.listdir(tmp_path) == []


def test_only_regular_files_are_opened(tmp_path, within):
    regular = tmp_path / "a.png"
    regular.write_bytes(b"data")
    assert regular_file_problem(regular) is None
    with open_regular_file(regular) as f:
        assert f.read() == b"data"
    os.mkfifo(tmp_path / "fifo.png")
    assert regular_file_problem(tmp_path / "fifo.png") == "is a FIFO, not a regular file"
    with pytest.raises(ValueError, match=r"fifo\.png' is a FIFO, not a regular file"):
        within(10, open_regular_file, tmp_path / "fifo.png", fifos=[tmp_path / "fifo.png"])
    (tmp_path / "folder.png").mkdir()
    assert regular_file_problem(tmp_path / "folder.png") == "is a folder, not a regular file"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "sock.png"))
        with pytest.raises(ValueError, match=r"sock\.png' is a socket, not a regular file"):
            open_regular_file(tmp_path / "sock.png")
    assert regular_file_problem("/dev/null") == "is a character device, not a regular file"
    assert regular_file_problem(tmp_path / "missing.png") == "does not exist"
    with pytest.raises(FileNotFoundError):
        open_regular_file(tmp_path / "missing.png")
    os.symlink(tmp_path / "fifo.png", tmp_path / "link.png")
    assert regular_file_problem(tmp_path / "link.png") == "is a FIFO, not a regular file"
