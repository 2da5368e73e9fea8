"""ATLaS soft labels against float64 loop references, and their use by clip_cross_entropy."""
import math
import os

import pytest
import torch

import fastprompt
from fastprompt import _backend
from fastprompt.data import class_soft_labels, instance_soft_labels
from fastprompt.models import zeroshot_text_features


def _generator():
    seed = int.from_bytes(os.urandom(4), "little")
    return seed, torch.Generator().manual_seed(seed)


def _cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def _softmax(values):
    finite = [v for v in values if v is not None]
    top = max(finite)
    e = [0.0 if v is None else math.exp(v - top) for v in values]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize("c, d, temperature", [(2, 3, 0.01), (7, 5, 0.05), (13, 64, 1.0)])
def test_class_soft_labels_match_a_loop_reference(c, d, temperature, include_self):
    seed, g = _generator()
    text = torch.randn(c, d, generator=g) * 3
    got = class_soft_labels(text, temperature=temperature, include_self=include_self)
    t = text.double().tolist()
    truth = torch.tensor([_softmax([None if (i == j and not include_self) else
                                    _cos(t[i], t[j]) / temperature for j in range(c)])
                          for i in range(c)], dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (c, c)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-7, msg=f"seed={seed}")
    torch.testing.assert_close(got.double().sum(1), torch.ones(c, dtype=torch.float64))
    if not include_self:
        assert bool((got.diagonal() == 0).all())


def test_class_soft_labels_bad_input():
    with pytest.raises(ValueError, match="^text_features: class-wise soft labels need at least 2"):
        class_soft_labels(torch.randn(1, 4))
    with pytest.raises(ValueError, match="^temperature: must be positive"):
        class_soft_labels(torch.randn(3, 4), temperature=0.0)
    with pytest.raises(ValueError, match="^text_features: a row has zero norm"):
        class_soft_labels(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="^text_features"):
        class_soft_labels(torch.ones(3, 4, dtype=torch.int64))


@pytest.mark.parametrize("m, c, d, dtype", [(1, 2, 3, torch.float32), (9, 5, 7, torch.float16),
                                            (6, 11, 64, torch.float32)])
def test_instance_soft_labels_match_a_loop_reference(m, c, d, dtype):
    seed, g = _generator()
    # Uneven view counts per image, rows in random order.
    counts = torch.randint(1, 4, (m,), generator=g)
    index = torch.repeat_interleave(torch.arange(m), counts)
    index = index[torch.randperm(len(index), generator=g)]
    feats = torch.randn(len(index), d, generator=g).to(dtype)
    text = torch.randn(c, d, generator=g)
    scale = 30.0
    got = instance_soft_labels(feats, index, text, scale=scale, num_samples=m)
    x, t = feats.double().tolist(), text.double().tolist()
    truth = []
    for k in range(m):
        rows = [_softmax([scale * _cos(x[r], t[j]) for j in range(c)])
                for r in range(len(index)) if int(index[r]) == k]
        truth.append([sum(p[j] for p in rows) / len(rows) for j in range(c)])
    truth = torch.tensor(truth, dtype=torch.float64)
    assert got.dtype == torch.float32 and got.shape == (m, c)
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-7, msg=f"seed={seed}")
    torch.testing.assert_close(got.double().sum(1), torch.ones(m, dtype=torch.float64))


def test_instance_soft_labels_bad_input():
    feats, text = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="^sample_index: image 1 has no rows"):
        instance_soft_labels(feats, torch.tensor([0, 2, 2, 0]), text)
    with pytest.raises(ValueError, match=r"^sample_index: values must lie in \[0, 2\)"):
        instance_soft_labels(feats, torch.tensor([0, 1, 2, 0]), text, num_samples=2)
    with pytest.raises(ValueError, match="^sample_index: expected 4 indices"):
        instance_soft_labels(feats, torch.tensor([0, 1]), text)
    with pytest.raises(ValueError, match="^text_features: feature dimension 5"):
        instance_soft_labels(feats, torch.tensor([0, 1, 1, 0]), torch.randn(2, 5))
    with pytest.raises(ValueError, match="^scale: must be positive"):
        instance_soft_labels(feats, torch.tensor([0, 1, 1, 0]), text, scale=-1.0)


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("cpp", marks=pytest.mark.skipif(not _backend.cpp_available(),
                                                 reason="C++ extension not built"))])
def test_tables_feed_clip_cross_entropy(cached_shapes, monkeypatch, backend):
    """The ISL (M x C, a row per image, read through ``sample_index``) and CSL (C x C, a row per
    class, read through the labels) tables of a real cache, fed to ``clip_cross_entropy``,
    give the mean over the views of ``(1-ε)·CE(hard) + ε·(-Σ_c r_c log p_c)`` with ``r`` the
    view's image's (ISL) or label's (CSL) row: written out here in float64."""
    monkeypatch.setenv("FASTPROMPT_BACKEND", backend)
    shared = cached_shapes()
    model, tokenizer, cache = shared.model, shared.tokenizer, shared.cache
    text = zeroshot_text_features(model, tokenizer, cache.classnames)
    isl = instance_soft_labels(cache.train_features, cache.train_sample_index, text,
                               scale=model.logit_scale.exp().item(),
                               num_samples=cache.num_train_images)
    csl = class_soft_labels(text)
    feats, labels = cache.train_features.float(), cache.train_labels
    scale, smoothing = 10.0, 0.1

    x = feats.double() / feats.double().norm(dim=1, keepdim=True)
    t = text.double() / text.double().norm(dim=1, keepdim=True)
    logp = torch.log_softmax(scale * x @ t.T, dim=1)                      # N x C
    hard = -logp[torch.arange(len(labels)), labels]

    def truth(rows):
        """The loss with soft-label rows ``rows`` (N x C, one per view)."""
        return ((1 - smoothing) * hard - smoothing * (rows.double() * logp).sum(dim=1)).mean()

    uniform = truth(torch.full_like(logp, 1 / cache.num_classes))
    for name, table, index, rows in (("isl", isl, cache.train_sample_index,
                                      isl[cache.train_sample_index]),
                                     ("csl", csl, None, csl[labels])):
        loss = fastprompt.clip_cross_entropy(feats, text, labels, scale, smoothing=smoothing,
                                             soft_labels=table, sample_index=index)
        expected = truth(rows)
        assert loss.dtype == torch.float32 and loss.shape == ()
        torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name} on {backend}: {m}")
        # The table's rows decide the loss: uniform smoothing lies far outside that tolerance.
        assert abs(expected - uniform).item() > 1e-3, name


def test_instance_soft_labels_into_a_file_backed_table(tmp_path, monkeypatch):
    """Written block by block into an unlinked temporary file, the table equals the in-memory
    one bit for bit, and the file has no name left in the folder."""
    from fastprompt.data import soft_labels
    seed, g = _generator()
    m, views, c, d = 37, 3, 5, 8
    index = torch.arange(m).repeat(views)  # the cache's view-major rows
    feats = torch.randn(m * views, d, generator=g).half()
    text = torch.randn(c, d, generator=g)
    in_memory = instance_soft_labels(feats, index, text, num_samples=m)
    monkeypatch.setattr(soft_labels, "_CHUNK_ROWS", 10)   # 3 images a block: 13 blocks
    table = soft_labels.file_backed_table(m, c, str(tmp_path))
    assert instance_soft_labels(feats, index, text, num_samples=m, out=table) is table
    assert torch.equal(table, in_memory), f"seed={seed}"
    assert os.listdir(tmp_path) == []
    with open("/proc/self/maps") as f:
        assert any(str(tmp_path) in line and "(deleted)" in line for line in f)
    with pytest.raises(ValueError, match=r"^out: expected a \(37, 5\) float32 CPU tensor"):
        instance_soft_labels(feats, index, text, out=torch.empty(37, 4))
