"""The exact two-pass text backward (--text-chunk): the same loss and parameter gradients as the
plain backward for every method and target kind, uneven chunks included, the same trained prompt,
resume across chunk sizes, and bad values refused."""
import contextlib
import json

import pytest
import torch

import fastprompt
from fastprompt.cli import main
from fastprompt.data.soft_labels import class_soft_labels
from fastprompt.models import PromptedTextModel
from fastprompt.models.softcpt import SoftCPTModel
from fastprompt.train import (CoOpLearner, TrainConfig, read_prompt, text_backward,
                              train_run, train_softcpt_run)
from fastprompt.train.coop import coop_encoding
from fastprompt.train.files import read_prompt_file
from fastprompt.train.softcpt import softcpt_encoding
from fastprompt.train.text_backward import (ChunkedTextBackward, activation_bytes_per_class,
                                            choose_text_chunk)

CLASSES = ["cat", "dog", "red fox", "sea turtle", "hot air balloon", "oak tree", "tram"]
CHUNKS = [1, 3, 7, 50]  # K=1, uneven (7 = 3+3+1), one chunk, K > C


def batch(gen, c, n=6, e=64):
    images = torch.randn(n, e, generator=gen)
    labels = torch.randint(c, (n,), generator=gen)
    return images, labels


LOSSES = {
    "coop-ce": lambda: {},
    "dspt-ls": lambda: dict(double_softmax=True, smoothing=0.3),
    "ce-csl": lambda: dict(smoothing=0.5, soft_labels="csl"),
    "dspt-isl": lambda: dict(double_softmax=True, smoothing=0.4, soft_labels="isl"),
}


def assert_same_gradient(actual, expected):
    """Equal up to float32 rounding of sums over the classes (in a different order)."""
    assert expected.abs().max() > 0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())


def loss_options(kind, gen, c, n):
    opts = LOSSES[kind]()
    if opts.get("soft_labels") == "csl":
        opts["soft_labels"] = class_soft_labels(torch.randn(c, 64, generator=gen), temperature=0.5)
    elif opts.get("soft_labels") == "isl":
        opts["soft_labels"] = torch.softmax(torch.randn(n + 3, c, generator=gen), 1)
        opts["sample_index"] = torch.randperm(n + 3, generator=gen)[:n]
    return opts


def plain_and_chunked(prompted, chunk, loss_of_text, prograd=False):
    """(loss, grad) of the plain backward, then of the chunked one, for the prompt context."""
    ctx = prompted.prompt_learner.ctx
    out = []
    for chunked in (None, ChunkedTextBackward(coop_encoding(prompted), chunk)):
        ctx.grad = None
        text = prompted() if chunked is None else chunked.features()
        loss, kl = loss_of_text(text)
        if chunked is not None:
            chunked.backward(loss, kl, lam=0.7)
        elif prograd:
            fastprompt.prograd_backward(loss, kl, [ctx], lam=0.7)
        else:
            loss.backward()
        out.append((loss.detach(), ctx.grad.clone()))
    return out


@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("class_specific", [False, True])
def test_coop_step_equals_plain(tiny_text, seed, chunk, kind, class_specific):
    model, tok = tiny_text
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompted = PromptedTextModel(model, tok, CLASSES, n_ctx=3, class_specific=class_specific,
                                 class_token_position="middle")
    images, labels = batch(gen, len(CLASSES))
    opts = loss_options(kind, gen, len(CLASSES), len(labels))
    (l0, g0), (l1, g1) = plain_and_chunked(
        prompted, chunk,
        lambda t: (fastprompt.clip_cross_entropy(images, t, labels, 50.0, **opts), None))
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert_same_gradient(g1, g0)


@pytest.mark.parametrize("chunk", [1, 3, 50])
@pytest.mark.parametrize("kind", ["coop-ce", "dspt-isl"])
def test_prograd_step_equals_plain(tiny_text, seed, chunk, kind):
    model, tok = tiny_text
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    prompted = PromptedTextModel(model, tok, CLASSES, n_ctx=3)
    images, labels = batch(gen, len(CLASSES))
    opts = loss_options(kind, gen, len(CLASSES), len(labels))
    # A zero-shot teacher far from the current prompt, so that the projection acts.
    zeroshot = torch.randn(len(CLASSES), 64, generator=gen)
    (l0, g0), (l1, g1) = plain_and_chunked(
        prompted, chunk,
        lambda t: fastprompt.prograd_losses(images, t, zeroshot, labels, 50.0, temperature=2.0,
                                            **opts), prograd=True)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert_same_gradient(g1, g0)


@pytest.mark.parametrize("chunk", [1, 2, 4, 50])
@pytest.mark.parametrize("prograd", [False, True])
def test_softcpt_step_equals_plain(tiny_text, seed, chunk, prograd):
    model, tok = tiny_text
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # Tasks of different class counts and prompt lengths; a batch meets tasks 2 and 0.
    net = SoftCPTModel(model, tok, ["animals", "things", "more"],
                       [CLASSES[:3], CLASSES[3:], ["hot air balloon", "x"]], n_ctx=3, n_task_ctx=2)
    present = [2, 0]
    data = [batch(gen, len(net.task_classnames[t]), n=4) for t in present]
    zeroshot = [torch.randn(len(net.task_classnames[t]), 64, generator=gen) for t in present]
    params = net.trainable_parameters()

    def losses(texts):
        loss = kl = 0
        for text, (images, labels), z in zip(texts, data, zeroshot):
            if prograd:
                a, b = fastprompt.prograd_losses(images, text, z, labels, 50.0)
                loss, kl = loss + a / 2, kl + b / 2
            else:
                loss = loss + fastprompt.clip_cross_entropy(images, text, labels, 50.0) / 2
        return loss, (kl if prograd else None)

    for p in params:
        p.grad = None
    l0, kl0 = losses(net(present))
    if prograd:
        fastprompt.prograd_backward(l0, kl0, params, lam=1.0)
    else:
        l0.backward()
    g0 = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    encoding, sizes = softcpt_encoding(net, present)
    chunked = ChunkedTextBackward(encoding, chunk)
    l1, kl1 = losses(chunked.features().split(sizes))
    chunked.backward(l1, kl1, lam=1.0)
    torch.testing.assert_close(l1.detach(), l0.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(g0, (p.grad for p in params)):
        assert_same_gradient(b, a)


def test_backward_before_features_is_refused(tiny_text):
    model, tok = tiny_text
    chunked = ChunkedTextBackward(coop_encoding(PromptedTextModel(model, tok, CLASSES, n_ctx=2)), 2)
    with pytest.raises(RuntimeError, match="features"):
        chunked.backward(torch.zeros((), requires_grad=True))


# ---------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def setup(cached_shapes):
    """The tiny model (its weights also as a file), a 5-class shapes set and its cache (shared:
    read-only)."""
    shared = cached_shapes(5, images_per_class=4, test_images_per_class=2, data_seed=3, views=2,
                           noise_rate=0.2, seed=2)
    return shared.model, shared.tokenizer, shared.cache, shared.weights


def config(weights, **kw):
    return TrainConfig(**{**dict(model="fastprompt-tiny", pretrained=weights, epochs=3,
                                 batch_size=8, n_ctx=4), **kw})


@pytest.mark.parametrize("combo", [dict(), dict(loss="dspt", targets="csl", prograd=True),
                                   dict(targets="isl", class_specific=True)],
                         ids=["coop", "dspt-csl-prograd", "isl-csc"])
def test_training_gives_the_same_prompt(setup, tmp_path, combo):
    model, tok, cache, weights = setup
    cfg = config(weights, **combo)
    plain = train_run(cfg, cache, model, tok, tmp_path / "plain", progress=False)
    chunked = train_run(cfg, cache, model, tok, tmp_path / "chunked", progress=False,
                        text_chunk=2)
    assert plain["text_chunk"] == 0 and chunked["text_chunk"] == 2
    torch.testing.assert_close(read_prompt(tmp_path / "chunked")[0],
                               read_prompt(tmp_path / "plain")[0], rtol=1e-4, atol=1e-6)
    for a, b in zip(plain["epochs"], chunked["epochs"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_chunked_run_resumes_without_chunking(setup, tmp_path, monkeypatch,
                                              interrupt_at_epoch):
    model, tok, cache, weights = setup
    cfg = config(weights, epochs=4)
    full = train_run(cfg, cache, model, tok, tmp_path / "full", progress=False)
    interrupt_at_epoch(CoOpLearner, 2)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, cache, model, tok, tmp_path / "cut", progress=False, text_chunk=3)
    monkeypatch.undo()
    resumed = train_run(cfg, cache, model, tok, tmp_path / "cut", resume=True, progress=False)
    torch.testing.assert_close(read_prompt(tmp_path / "cut")[0], read_prompt(tmp_path / "full")[0],
                               rtol=1e-4, atol=1e-6)
    assert resumed["epochs"][-1]["loss"] == pytest.approx(full["epochs"][-1]["loss"], rel=1e-5)


def test_softcpt_training_gives_the_same_prompt(cached_shapes_tasks, tmp_path):
    """Two generated tasks of 3 classes each (shared caches: read-only)."""
    shared = cached_shapes_tasks(3, 3, images_per_class=4, test_images_per_class=2, size=32,
                                 data_seed=4, views=2, noise_rate=0.25, seed=2)
    model, tok, weights = shared.model, shared.tokenizer, shared.weights
    tasks = list(shared.tasks[:2])
    cfg = config(weights, learner="softcpt", epochs=2, prograd=True, targets="ls")
    plain = train_softcpt_run(cfg, tasks, model, tok, tmp_path / "plain", progress=False)
    chunked = train_softcpt_run(cfg, tasks, model, tok, tmp_path / "chunked", progress=False,
                                text_chunk=2)
    assert chunked["text_chunk"] == 2
    for key, value in read_prompt_file(tmp_path / "plain").tensors.items():
        torch.testing.assert_close(read_prompt_file(tmp_path / "chunked").tensors[key], value,
                                   rtol=1e-4, atol=1e-6)
    assert chunked["epochs"][-1]["loss"] == pytest.approx(plain["epochs"][-1]["loss"], rel=1e-5)


# The automatic K


def test_choose_text_chunk():
    mib = 2**20
    assert choose_text_chunk(1 * mib, 100 * mib, 50) == 0        # all fit in half: plain
    assert choose_text_chunk(1 * mib, 100 * mib, 51) == 50       # else the most that fit
    assert choose_text_chunk(1 * mib, 100 * mib, 10**6) == 50
    assert choose_text_chunk(300 * mib, 100 * mib, 7) == 1       # never less than one class
    assert choose_text_chunk(0.0, 0, 7) == 0


def test_activation_bytes_per_class_is_what_a_class_adds(tiny_text):
    """The probe's bytes per class predict the saved activations of a forward over many
    classes (context and weights do not grow with C)."""
    model, tok = tiny_text
    prompted = PromptedTextModel(model, tok, [f"class {i}" for i in range(40)], n_ctx=4)
    encoding = coop_encoding(prompted)
    per_class = activation_bytes_per_class(encoding)
    one = text_backward._saved_bytes(encoding, 1, contextlib.nullcontext)
    forty = text_backward._saved_bytes(encoding, 40, contextlib.nullcontext)
    assert per_class > 0
    assert one + 39 * per_class == pytest.approx(forty, rel=0.02)


def test_auto_text_chunk_follows_free_memory(setup, tmp_path, monkeypatch):
    """``text_chunk="auto"`` takes the plain backward when the classes fit and chunks when they
    do not; either way the run trains the plain run's prompt."""
    model, tok, cache, weights = setup
    cfg = config(weights, epochs=2)
    per_class = activation_bytes_per_class(coop_encoding(
        PromptedTextModel(model, tok, cache.classnames, n_ctx=cfg.n_ctx)))
    plain = train_run(cfg, cache, model, tok, tmp_path / "plain", progress=False)
    roomy = train_run(cfg, cache, model, tok, tmp_path / "roomy", progress=False,
                      text_chunk="auto")
    assert roomy["text_chunk"] == 0 and roomy["text_chunk_auto"] and not plain["text_chunk_auto"]
    # Room for two classes' activations in half the free memory (5 classes in the cache).
    monkeypatch.setattr(text_backward, "free_memory_bytes",
                        lambda device: int(2 * 2.5 * per_class))
    tight = train_run(cfg, cache, model, tok, tmp_path / "tight", progress=False,
                      text_chunk="auto")
    assert tight["text_chunk"] == 2
    torch.testing.assert_close(read_prompt(tmp_path / "tight")[0],
                               read_prompt(tmp_path / "plain")[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "automatic"])
def test_bad_text_chunk_is_refused(setup, tmp_path, bad):
    model, tok, cache, weights = setup
    with pytest.raises(ValueError, match="text_chunk"):
        train_run(config(weights), cache, model, tok, tmp_path / "bad", progress=False,
                  text_chunk=bad)
    assert not (tmp_path / "bad").exists()


def test_cli_text_chunk_is_recorded(setup, tmp_path, capsys):
    _, _, cache, weights = setup
    for value, expected in (("2", 2), ("auto", 0)):
        out = tmp_path / f"run-{value}"
        code = main(["train", "--pretrained", weights, "--cache", cache.path, "--out", str(out),
                     "--epochs", "1", "--n-ctx", "2", "--text-chunk", value, "--no-progress"])
        assert code == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["text_chunk"] == expected
    assert "--text-chunk auto: the plain backward for 5 classes on cpu" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--cache", cache.path, "--out", str(tmp_path / "x"), "--text-chunk", "k"])
    assert e.value.code == 2
    assert "--text-chunk: expected classes per chunk (an int >= 0) or 'auto', got 'k'" in capsys.readouterr().err


def test_chunked_backward_and_compiled_step_do_not_combine(tiny_text, tmp_path):
    with pytest.raises(ValueError, match="^text_chunk: the chunked text backward does not run"):
        train_run(TrainConfig(epochs=1), None, tiny_text[0], tiny_text[1], tmp_path / "run",
                  compile=True, text_chunk=2)
    assert not (tmp_path / "run").exists()
