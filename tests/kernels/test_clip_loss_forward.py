"""The fused forward's host code: how many class ranges a shape gets. The kernel's results, its
split paths forced at test sizes included: tests/ops/test_cuda_schedules.py."""
from __future__ import annotations

import pytest


@pytest.mark.usefixtures("triton_device")
def test_class_splits_follow_the_shape():
    # The documented rule at the GPU block sizes: class ranges only while the row blocks leave
    # most of the notional 132 SMs idle.
    from fastprompt.kernels.clip_loss_forward import class_splits  # imports triton

    assert class_splits(256, 1000, 16, 32) == 8  # 16 row blocks x 8 ranges of 4 tiles
    assert class_splits(1, 21843, 16, 32) == 132
    assert class_splits(33, 7, 16, 32) == 1  # one tile of classes
    assert class_splits(65536, 1000, 64, 32) == 1
