"""Tasks files: task names are checked as class names are (issue 23, item 4)."""
from __future__ import annotations

import json
import unicodedata

import pytest

from fastprompt.data.tasks import read_tasks_file


def test_task_names_are_checked_and_normalised(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tasks = tmp_path / "tasks.json"
    nfd = unicodedata.normalize("NFD", "crème")
    tasks.write_text(json.dumps([{"name": nfd, "data": "a"}, {"name": "pets", "data": "b"}]))
    assert [t.name for t in read_tasks_file(tasks)] == ["crème", "pets"]
    tasks.write_text(json.dumps([{"name": "pets", "data": "a"},
                                 {"name": "evil\u202egnp", "data": "b"}]))
    with pytest.raises(ValueError, match=r"^tasks file .*: task 2 name 'evil\\u202egnp' contains "
                                         r"the control character"):
        read_tasks_file(tasks)
