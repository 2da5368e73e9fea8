"""The ops' value checks: at most one host synchronisation per call, switched off by
set_validation / FASTPROMPT_VALIDATION, and what an unchecked bad input gives (a NaN loss, never a
fault); plus the ops launching on their tensors' device (the launch helpers themselves:
tests/kernels/test_launch.py)."""
from __future__ import annotations

import pytest
import torch

import fastprompt
from fastprompt import _validation
from testlib import backend, make_inputs  # noqa: F401 (fixture)


@pytest.fixture
def validation_off():
    _validation.set_validation(False)
    yield
    _validation._enabled = None


def test_value_checks_cost_at_most_one_sync(backend, monkeypatch, seed):
    # Every value check of a call is read back by one .tolist(); none when the C++ kernel checks
    # the values itself (only the soft-label table is left to Python there).
    name, device = backend
    x, t, labels, s, kw = make_inputs(6, 5, 8, target="instancewise", device=device, seed=seed)
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    fastprompt.clip_cross_entropy(x, t.requires_grad_(), labels, s, **kw)
    fastprompt.prograd_losses(x, t, t.detach() + 1, labels, s, **kw)
    assert len(calls) <= 2, calls
    calls.clear()
    fastprompt.clip_cross_entropy(x, t, labels, s)
    assert len(calls) == (0 if name == "cpp" else 1)


def test_set_validation_turns_value_checks_off(backend, validation_off, seed):
    name, device = backend
    x, t, labels, s, _ = make_inputs(6, 5, 8, device=device, seed=seed)
    table = torch.full((5, 5), 0.5, device=device)  # rows sum to 2.5: a value error
    loss = fastprompt.clip_cross_entropy(x, t, labels, s, smoothing=0.1, soft_labels=table)
    assert loss.shape == ()
    # Shape, dtype and type checks stay on.
    with pytest.raises(ValueError, match="^labels"):
        fastprompt.clip_cross_entropy(x, t, labels[:3], s)
    with pytest.raises(TypeError, match="^enabled"):
        fastprompt._validation.set_validation("no")


def test_environment_variable_turns_value_checks_off(monkeypatch, seed):
    x, t, labels, s, _ = make_inputs(6, 5, 8, seed=seed)
    table = torch.full((5, 5), 0.5)
    monkeypatch.setenv("FASTPROMPT_VALIDATION", "0")
    assert not _validation.validation_enabled()
    fastprompt.clip_cross_entropy(x, t, labels, s, smoothing=0.1, soft_labels=table)
    monkeypatch.setenv("FASTPROMPT_VALIDATION", "1")
    with pytest.raises(ValueError, match="^soft_labels: every row must sum to 1"):
        fastprompt.clip_cross_entropy(x, t, labels, s, smoothing=0.1, soft_labels=table)


@pytest.mark.parametrize("double_softmax", [False, True])
def test_unchecked_bad_label_gives_nan_loss_never_a_fault(backend, validation_off, double_softmax,
                                                          seed):
    # With validation off a label (or sample index) outside its range gives that row a NaN loss
    # from the fused kernels, which clamp every index they load. The C++ kernel checks labels as
    # it reads them anyway (free there), so it still raises; the reference uses torch's indexing.
    name, device = backend
    x, t, labels, s, kw = make_inputs(7, 5, 8, target="instancewise", device=device, seed=seed)
    bad = labels.clone()
    bad[2] = 5
    bad[4] = -3
    bad_index = kw["sample_index"].clone()
    bad_index[5] = 10_000
    for args in ((x, t, bad, s), (x, t, labels, s)):
        opts = dict(kw, double_softmax=double_softmax, reduction="none")
        if args[2] is labels:
            opts["sample_index"] = bad_index
        if name == "cpp":
            with pytest.raises(ValueError, match="^(labels|sample_index): values must lie in"):
                fastprompt.clip_cross_entropy(*args, **opts)
            continue
        if name == "reference":
            with pytest.raises((IndexError, RuntimeError)):
                fastprompt.clip_cross_entropy(*args, **opts)
            continue
        rows = fastprompt.clip_cross_entropy(*args, **opts)
        expected_bad = {2, 4} if args[2] is bad else {5}
        good = [i for i in range(7) if i not in expected_bad]
        assert torch.isnan(rows[sorted(expected_bad)]).all()
        with torch.enable_grad():
            want = fastprompt.reference.clip_cross_entropy(
                x[good], t, labels[good], s, double_softmax=double_softmax, reduction="none",
                smoothing=kw["smoothing"], soft_labels=kw["soft_labels"],
                sample_index=kw["sample_index"][good])
        torch.testing.assert_close(rows[good], want, rtol=1e-5, atol=1e-5)


def test_loss_choice_and_logits_checks_cost_at_most_one_sync(backend, monkeypatch, seed):
    # Per-row exponents and the logits ops' checks join the one read-back of each call; none
    # without a table on the C++ backend, whose kernels check the values themselves.
    name, device = backend
    x, t, labels, s, kw = make_inputs(6, 5, 8, target="instancewise", device=device, seed=seed)
    q = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.0, 1.0], device=device)
    z = torch.randn(6, 5).to(device)
    calls = []
    original = torch.Tensor.tolist

    def counting(self):
        calls.append(self.shape)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    fastprompt.clip_cross_entropy(x, t, labels, s, loss="gce", q=q, **kw)
    fastprompt.logits_cross_entropy(z, labels, loss="gce", q=q, **kw)
    fastprompt.logits_prograd_losses(z, z + 1, labels, loss="gce", q=q, **kw)
    assert len(calls) <= 3, calls
    calls.clear()
    fastprompt.logits_cross_entropy(z, labels, loss="gce", q=q)
    fastprompt.logits_prograd_losses(z, z + 1, labels, loss="mae")
    assert len(calls) == (0 if name == "cpp" else 2)


def test_unchecked_exponents_give_the_formula_never_a_fault(backend, validation_off, seed):
    # With validation off an exponent outside [0, 1] is not refused by the Python layer: the
    # fused Triton kernel and the reference evaluate the same formula (finite for q = 2); the
    # C++ kernel checks the exponents as it reads them (free there) and still raises.
    name, device = backend
    x, t, labels, s, kw = make_inputs(7, 5, 8, target="uniform", device=device, seed=seed)
    q = torch.tensor([0.0, 2.0, 0.5, 1.0, 0.3, 2.0, 0.0], device=device)
    opts = dict(kw, loss="gce", q=q, reduction="none", double_softmax=True)
    if name == "cpp":
        with pytest.raises(ValueError, match=r"^q: values must lie in \[0, 1\]"):
            fastprompt.clip_cross_entropy(x, t, labels, s, **opts)
        return
    rows = fastprompt.clip_cross_entropy(x, t, labels, s, **opts)
    want = fastprompt.reference.clip_cross_entropy(x.double(), t.double(), labels, s.double(),
                                                   **opts)
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_run_on_the_tensors_device(seed):
    # Tensors on cuda:1 while cuda:0 is current: the kernels must launch on cuda:1.
    x, t, labels, s, kw = make_inputs(9, 6, 12, target="uniform", device="cuda:1", seed=seed)
    with torch.cuda.device(0):
        t_req = t.clone().requires_grad_()
        loss = fastprompt.clip_cross_entropy(x, t_req, labels, s, **kw)
        loss.backward()
        grads = [torch.randn(5, device="cuda:1")]
        refs = [-grads[0].clone()]
        fastprompt.project_conflicting_(grads, refs)
    want = fastprompt.reference.clip_cross_entropy(x.double(), t.double(), labels, s.double(), **kw)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], torch.zeros_like(grads[0]), rtol=0, atol=1e-6)
