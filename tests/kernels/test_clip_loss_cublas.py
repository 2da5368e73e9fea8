"""The cuBLAS schedule's forward (``clip_loss_cublas.clip_loss_forward``) over several chunks of
samples against the float64 formulas. Both schedules through the ops:
tests/ops/test_cuda_schedules.py."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from testlib import assert_close_to_truth, logit_terms64, make_prograd_inputs


@pytest.mark.parametrize("prograd", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5])
def test_cublas_chunks_match_float64(triton_device, chunk_rows, prograd, seed):
    # Several chunks of the cuBLAS schedule (the last one partial) give the per-row losses and
    # logit gradients of the float64 formulas.
    from fastprompt.kernels.clip_loss_cublas import clip_loss_forward  # imports triton

    x, t, t0, labels, s, kw = make_prograd_inputs(13, 11, 19, target="instancewise",
                                                  device=triton_device, seed=seed)
    outputs = clip_loss_forward(x, t, t0 if prograd else None, labels, s, kw["soft_labels"],
                                kw["sample_index"], kw["smoothing"], True, True, 1.0, True,
                                chunk_rows=chunk_rows)
    z, grad, _ = logit_terms64(x, t, labels, s, kw, True, torch.ones(13, dtype=torch.float64))
    kw64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
            for k, v in kw.items()}
    want_rows = fastprompt.reference.clip_cross_entropy(
        x.double(), t.double(), labels, s.double(), double_softmax=True, reduction="none", **kw64)
    assert_close_to_truth(outputs[0], want_rows, 1e-5, 1e-5, "loss rows")
    assert_close_to_truth(outputs[1], grad, 1e-5, 1e-5, "grad logits")
    if prograd:
        z0 = fastprompt.reference.clip_logits(x.double().cpu(), t0.double().cpu(),
                                              s.double().cpu())
        p0 = torch.softmax(z0, dim=1)
        want_kl = -(p0 * torch.log_softmax(z, dim=1)).sum(dim=1)
        assert_close_to_truth(outputs[2], want_kl, 1e-5, 1e-5, "kl rows")
        assert_close_to_truth(outputs[3], torch.softmax(z, dim=1) - p0, 1e-5, 1e-5,
                              "grad kl logits")
