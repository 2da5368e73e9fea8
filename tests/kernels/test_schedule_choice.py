"""``FASTPROMPT_CUDA_SCHEDULE``: the names it takes, its default, and the message for others."""
from __future__ import annotations

import pytest

from fastprompt.kernels import schedule_choice


def test_schedule_names(monkeypatch):
    monkeypatch.delenv("FASTPROMPT_CUDA_SCHEDULE", raising=False)
    assert schedule_choice.schedule() == "cublas"
    monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", " Fused ")
    assert schedule_choice.schedule() == "fused"
    monkeypatch.setenv("FASTPROMPT_CUDA_SCHEDULE", "cutlass")
    with pytest.raises(ValueError, match="^FASTPROMPT_CUDA_SCHEDULE: must be one of"):
        schedule_choice.schedule()
