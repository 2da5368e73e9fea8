"""A rank of the class-sharding tests, launched by ``torchrun`` (tests/train/test_class_sharding.py).

    python sharding_worker.py steps OUT SEED CACHE    every step case sharded over the ranks,
                                                       and the refusals; rank r writes OUT/rank{r}.pt
    python sharding_worker.py interrupt EPOCH ARGS... ``fastprompt ARGS`` stopped (as by Ctrl-C)
                                                       when epoch EPOCH starts
    python sharding_worker.py die RANK EPOCH ARGS...  ``fastprompt ARGS``, rank RANK killed
                                                       (SIGKILL) when epoch EPOCH starts; the
                                                       other ranks ignore torchrun's SIGTERM

The step cases also run in one process (``run_case`` with ``chunk=0``): the test's reference.
"""
from __future__ import annotations

import os
import sys

import torch

import fastprompt
from fastprompt.data.soft_labels import class_soft_labels
from fastprompt.models import PromptedTextModel
from fastprompt.models.softcpt import SoftCPTModel
from fastprompt.train.coop import coop_encoding
from fastprompt.train.softcpt import softcpt_encoding
from fastprompt.train.class_sharding import text_step

CLASSES = ["cat", "dog", "red fox", "sea turtle", "hot air balloon", "oak tree", "tram"]
TASKS = (["animals", "things", "more"], [CLASSES[:3], CLASSES[3:], ["hot air balloon", "x"]])
LAM = 0.7

# name: (learner, loss kind, text chunk). 7 classes over 2 ranks: 4 + 3; SoftCPT's batch meets
# tasks 2 and 0 (2 + 3 classes); "one-class" leaves rank 1 without classes.
CASES = {
    "coop-ce": ("shared", "ce", 0),
    "coop-ce-chunk2": ("shared", "ce", 2),
    "csc-ce": ("csc", "ce", 0),
    "csc-dspt-isl-chunk2": ("csc", "dspt-isl", 2),
    "dspt-ls": ("shared", "dspt-ls", 0),
    "ce-csl": ("shared", "ce-csl", 0),
    "ce-csl-chunk3": ("shared", "ce-csl", 3),
    "dspt-isl": ("shared", "dspt-isl", 0),
    "prograd-ce": ("shared", "prograd-ce", 0),
    "prograd-dspt-isl-chunk2": ("shared", "prograd-dspt-isl", 2),
    "softcpt-ce": ("softcpt", "ce", 0),
    "softcpt-ce-chunk2": ("softcpt", "ce", 2),
    "softcpt-prograd-ls": ("softcpt", "prograd-ce-ls", 0),
    "softcpt-prograd-chunk1": ("softcpt", "prograd-ce", 1),
    "one-class": ("one-class", "square", 0),
}


def _loss(kind: str, gen: torch.Generator, c: int, n: int = 6, e: int = 64):
    """text (c x e) -> (loss, kl or None), with the case's random batch and targets."""
    images = torch.randn(n, e, generator=gen)
    labels = torch.randint(c, (n,), generator=gen)
    opts = {}
    if "dspt" in kind:
        opts["double_softmax"] = True
    if kind.endswith("-ls"):
        opts["smoothing"] = 0.3
    if kind.endswith("-csl"):
        opts.update(smoothing=0.5, soft_labels=class_soft_labels(torch.randn(c, e, generator=gen),
                                                                 temperature=0.5))
    if kind.endswith("-isl"):
        opts.update(smoothing=0.4, soft_labels=torch.softmax(torch.randn(n + 3, c, generator=gen), 1),
                    sample_index=torch.randperm(n + 3, generator=gen)[:n])
    if kind.startswith("prograd"):
        # A zero-shot teacher far from the prompt, so that the projection acts.
        zeroshot = torch.randn(c, e, generator=gen)
        return lambda text: fastprompt.prograd_losses(images, text, zeroshot, labels, 50.0,
                                                      temperature=2.0, **opts)
    if kind == "square":
        weight = torch.randn(e, generator=gen)
        return lambda text: (((text * weight) ** 2).sum(), None)
    return lambda text: (fastprompt.clip_cross_entropy(images, text, labels, 50.0, **opts), None)


def run_case(name: str, seed: int, model, tokenizer, chunk: int | None = None) -> dict:
    """One step of case ``name``: ``{"loss", "grads"}`` (the trainable parameters' gradients).
    Under a process group of several ranks the classes are sharded; ``chunk`` overrides the
    case's text chunk (0 in one process: the plain backward, the reference)."""
    learner, kind, case_chunk = CASES[name]
    chunk = case_chunk if chunk is None else chunk
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if learner == "softcpt":
        net = SoftCPTModel(model, tokenizer, *TASKS, n_ctx=3, n_task_ctx=2)
        present = [2, 0]
        encoding, sizes = softcpt_encoding(net, present)
        parts = [_loss(kind, gen, size, n=4) for size in sizes]

        def loss_of(text):
            losses = [part(t) for part, t in zip(parts, text.split(sizes))]
            loss = sum(a for a, _ in losses) / 2
            return loss, (sum(b for _, b in losses) / 2 if kind.startswith("prograd") else None)

        def plain():
            return torch.cat(net(present))
    else:
        classes = ["cat"] if learner == "one-class" else CLASSES
        prompted = PromptedTextModel(model, tokenizer, classes, n_ctx=3,
                                     class_specific=learner == "csc",
                                     class_token_position="middle")
        encoding, plain = coop_encoding(prompted), prompted
        loss_of = _loss(kind, gen, len(classes))
    params = list(encoding.params)
    step = text_step(encoding, chunk)
    loss, kl = loss_of(plain() if step is None else step.features())
    if step is not None:
        step.backward(loss, kl, lam=LAM)
    elif kl is not None:
        fastprompt.prograd_backward(loss, kl, params, lam=LAM)
    else:
        loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in params]}


# Learners over the cache: (learner, TrainConfig fields, text chunk). CoCoOp's step encodes
# batch x classes prompts (4 x 3), which a chunk of 5 cuts across images.
LEARNER_CASES = {
    "kgcoop": ("kgcoop", {}, 0),
    "kgcoop-dspt-chunk2": ("kgcoop", {"loss": "dspt", "targets": "csl"}, 2),
    "cocoop": ("cocoop", {}, 0),
    "cocoop-prograd-chunk5": ("cocoop", {"prograd": True, "targets": "isl"}, 5),
}


def run_learner_case(name: str, seed: int, model, tokenizer, cache, chunk: int | None = None
                     ) -> dict:
    """One step of a learner on ``cache``'s first batch: ``{"loss", "grads"}`` of its trained
    tensors; classes (CoCoOp: image x class prompts) sharded under several ranks."""
    from fastprompt.train import TrainConfig
    from fastprompt.train.learner import learner_class
    learner_name, fields, case_chunk = LEARNER_CASES[name]
    chunk = case_chunk if chunk is None else chunk
    config = TrainConfig.for_learner(learner_name, n_ctx=2, ctx_init=None, batch_size=4,
                                     seed=seed % 10000,
                                     **fields)
    learner = learner_class(learner_name)(config, cache, model, tokenizer, torch.device("cpu"))
    conditional = getattr(learner, "conditional", None)
    if conditional is not None:
        # CoCoOp's meta-net has E // 16 hidden units (4 for the tiny model): with some seeds all
        # of them are off for the whole batch and its first layer gets no gradient to compare.
        with torch.no_grad():
            conditional.meta_net.linear1.bias.fill_(0.5)
    order = learner.epoch_order(1)  # an ATLaS soft epoch, where the fields ask for soft targets
    batch = order.batch(0, 4)
    encoding = learner.text_encoding(batch)
    params = list(learner.trainable().values())
    step = text_step(encoding, chunk)
    text = (encoding.encode(encoding.source(), 0, encoding.num_classes) if step is None
            else step.features())
    loss, kl = learner.batch_losses(text, batch)
    if step is not None:
        step.backward(loss, kl, lam=LAM)
    elif kl is not None:
        fastprompt.prograd_backward(loss, kl, params, lam=LAM)
    else:
        loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad.clone() for p in params]}


def _error(fn) -> tuple[str, str] | None:
    try:
        fn()
    except Exception as e:
        return type(e).__name__, str(e)
    return None


def steps(out: str, seed: int, cache_path: str) -> None:
    import torch.distributed as dist

    from fastprompt.data import load_cache
    from fastprompt.models import TINY_MODEL, create_model
    from fastprompt.train import TrainConfig, train_run
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, _, _, tokenizer = create_model(TINY_MODEL)
    results = {name: run_case(name, seed, model, tokenizer) for name in CASES}
    cache = load_cache(cache_path)
    results.update({name: run_learner_case(name, seed, model, tokenizer, cache)
                    for name in LEARNER_CASES})
    config = TrainConfig(epochs=1, n_ctx=2, batch_size=8)
    errors = {"compile": _error(lambda: train_run(config, cache, model, tokenizer,
                                                  os.path.join(out, "compiled"), compile=True,
                                                  progress=False))}
    # A rank whose text tower differs from rank 0's (the cache's hash covers the image tower).
    other, _, _, _ = create_model(TINY_MODEL)
    if rank == 1:
        with torch.no_grad():
            other.positional_embedding.add_(1e-3)
    errors["weights"] = _error(lambda: train_run(config, cache, other, tokenizer,
                                                 os.path.join(out, "weights"), progress=False))
    # The test holds this folder's lock: rank 0 cannot take it.
    errors["locked"] = _error(lambda: train_run(config, cache, model, tokenizer,
                                                os.path.join(out, "locked"), progress=False))
    torch.save({"results": results, "errors": errors}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def interrupt(epoch: int, argv: list[str]) -> int:
    from fastprompt.cli import main
    from fastprompt.train import CoOpLearner
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from testlib import stop_training_at
    stop_training_at(CoOpLearner, epoch)
    return main(argv)


def die(rank: int, epoch: int, argv: list[str]) -> int:
    import signal

    from fastprompt.cli import main
    from fastprompt.train import CoOpLearner
    real_epoch = CoOpLearner.train_epoch

    def killed(self, *, epoch: int, bar):
        if epoch == die_at and int(os.environ["RANK"]) == rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_epoch(self, epoch=epoch, bar=bar)

    die_at = epoch
    CoOpLearner.train_epoch = killed
    if int(os.environ["RANK"]) != rank:
        # torchrun's agent stops the other ranks as soon as it sees one fail: ignored here, so
        # that the test sees what a survivor says and its exit status whatever the timing.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return main(argv)


if __name__ == "__main__":
    if sys.argv[1] == "steps":
        steps(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1] == "interrupt":
        sys.exit(interrupt(int(sys.argv[2]), sys.argv[3:]))
    elif sys.argv[1] == "die":
        sys.exit(die(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    else:
        raise SystemExit(f"sharding_worker: unknown mode {sys.argv[1]!r}")
