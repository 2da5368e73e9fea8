"""The logit-gradient buffers' layout: rows padded to a multiple of 16 elements for the fused
schedule, a view of the first C columns. (That the fused forward op writes such rows and the
backward op reads them: test_fused_logit_gradient_rows_are_padded in
tests/ops/test_cuda_schedules.py.)"""
from __future__ import annotations

import torch

from fastprompt.kernels.logit_gradient_layout import (ROW_ALIGNMENT, logit_gradient_buffer,
                                                      padded_columns, with_padded_rows)


def test_padded_columns_round_up_to_the_row_alignment():
    assert ROW_ALIGNMENT == 16
    assert [padded_columns(c) for c in (1, 15, 16, 17, 37, 1000)] == [16, 16, 16, 32, 48, 1008]


def test_logit_gradient_buffer_strides():
    like = torch.empty(2, 3, dtype=torch.bfloat16)
    plain = logit_gradient_buffer(like, 5, 37, False)
    assert plain.shape == (5, 37) and plain.stride() == (37, 1) and plain.dtype == torch.bfloat16
    padded = logit_gradient_buffer(like, 5, 37, True)
    assert padded.shape == (5, 37) and padded.stride() == (48, 1) and padded.dtype == torch.bfloat16
    assert padded.untyped_storage().nbytes() == 5 * 48 * padded.element_size()


def test_with_padded_rows_keeps_the_values_and_zeros_the_padding():
    g = torch.randn(4, 37, generator=torch.Generator().manual_seed(0))
    padded = with_padded_rows(g)
    assert padded.shape == (4, 37) and padded.stride() == (48, 1)
    assert torch.equal(padded, g)
    assert torch.equal(padded.as_strided((4, 48), (48, 1))[:, 37:], torch.zeros(4, 11))
