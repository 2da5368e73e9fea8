"""The fused backward's host code: how many slices a product's reduction is split into. The
kernels' results, their split paths forced at test sizes included:
tests/ops/test_cuda_schedules.py."""
from __future__ import annotations

import pytest


@pytest.mark.usefixtures("triton_device")
def test_k_slices_follow_the_shape():
    # The documented rule at the GPU block sizes: reduction slices only for a reduction long next
    # to the output tiles (Gᵀ X̂ at large N, G T̂ at small N).
    from fastprompt.kernels.clip_loss_backward import k_slices  # imports triton

    blocks = dict(BLOCK_M=64, BLOCK_K=64, BLOCK_D=32)
    assert k_slices(1000, 65536, 512, blocks) == 3  # 256 output tiles, 1024 tiles of k
    assert k_slices(1000, 256, 512, blocks) == 1
    assert k_slices(7, 65536, 512, blocks) == 32
    assert k_slices(256, 1000, 512, blocks) == 2  # G T̂ at N = 256: 64 tiles, 16 tiles of k
