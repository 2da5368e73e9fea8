"""Epoch time of each learner over cached features against a loop written the way its official
trainer runs the same math, and CoCoOp's activation memory with and without --text-chunk.

    python bench/bench_learners.py                           # fastprompt-tiny and ViT-B-16
    python bench/bench_learners.py --models ViT-B-16 --classes 10 --shots 4

Both sides see the same cached image features (random, one view: the image tower is out of both
loops) and train the same parameters with SGD at the same learning rate:

* official-style: the full 77-token context through the text tower, eager float32 losses
  (``F.cross_entropy`` on ``logit_scale · x̂ t̂ᵀ``), and for CoCoOp one image at a time with
  batch 1, as ``KaiyangZhou/CoOp: trainers/cocoop.py`` and its config do;
* fastprompt: ``Learner.train_epoch`` (truncated prompts, fused loss; CoCoOp's B x C prompts
  of a step batched, batch 32).

Random weights (nothing is downloaded). The sides run in one process, interleaved, ``--repeats``
times after a warm-up epoch each; medians are reported. Memory: the bytes autograd keeps for
backward in one CoCoOp step (a saved-tensors hook), plain and with ``--text-chunk K``.
Writes bench/results/learners-<device>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

from fastprompt.data.cache import FeatureCache  # noqa: E402
from fastprompt.models import PromptLearner, PromptTextEncoder, create_model  # noqa: E402
from fastprompt.train import TrainConfig  # noqa: E402
from fastprompt.train.epoch import autocast, logit_scale  # noqa: E402
from fastprompt.train.learner import learner_class  # noqa: E402
from fastprompt.train.text_backward import ChunkedTextBackward  # noqa: E402

WORDS = ("red", "small", "river", "oak", "tabby", "cat", "airliner", "sports", "car", "rose",
         "golden", "retriever", "desert", "fox", "stone", "bridge", "tulip", "jet", "barn", "owl")
EPOCH = 3  # past the warm-up epoch: the learning rate plays no part in the time


def synthetic_cache(classes: int, shots: int, dim: int, g: torch.Generator) -> FeatureCache:
    m = classes * shots
    names = []
    while len(names) < classes:
        k = int(torch.randint(1, 4, (), generator=g))
        name = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))
        if name not in names:
            names.append(name)
    labels = torch.arange(m) % classes
    test = torch.randn(classes, dim, generator=g).half()
    return FeatureCache(
        path="<synthetic>", fingerprint={"views": 1, "model_weights": "bench"},
        classnames=names, train_features=torch.randn(m, dim, generator=g).half(),
        train_labels=labels, train_clean_labels=labels, train_sample_index=torch.arange(m),
        train_view_index=torch.zeros(m, dtype=torch.int64), test_features=test,
        test_labels=torch.arange(classes), val_features=test[:0],
        val_labels=torch.empty(0, dtype=torch.int64), train_paths=[""] * m,
        test_paths=[""] * classes, val_paths=[])


def official_step_fn(learner, name: str):
    """An epoch as the official trainer runs it: full-length prompts, eager losses; CoCoOp one
    image per step. Trains a copy of the learner's parameters."""
    config, cache, model = learner.config, learner.cache, learner.model
    encoder = PromptTextEncoder(model)
    full = PromptLearner(model, learner.tokenizer, cache.classnames, n_ctx=config.n_ctx,
                         ctx_init=config.ctx_init, truncate=False)
    ctx = full.ctx
    meta = (learner.meta_net if name in ("cocoop", "tcp") else None)
    params = [ctx, *(meta.parameters() if meta is not None else [])]
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=5e-4)
    scale = logit_scale(model)
    tokens = full.tokenized_prompts
    batch = 1 if name == "cocoop" else config.batch_size
    clip_text = getattr(learner, "clip_text", None)

    def text_features(shift=None):
        if name == "tcp":
            tokens_tcp = meta(clip_text).reshape(full.n_cls, config.n_ctx, -1)
            return encoder(full(), tokens, deep_prompts={config.tcp_layer: tokens_tcp},
                           deep_positions=full.ctx_positions)
        return encoder(full(None if shift is None else ctx + shift), tokens)

    def epoch():
        rows = torch.randperm(cache.train_features.shape[0])
        for start in range(0, len(rows), batch):
            r = rows[start:start + batch]
            x = F.normalize(cache.train_features[r].float(), dim=-1)
            y = cache.train_labels[r]
            if name == "cocoop":  # the official loop over the batch's images
                bias = meta(x)
                logits = torch.stack([scale * x_i @ F.normalize(text_features(b_i), dim=-1).T
                                      for x_i, b_i in zip(x, bias)])
                loss = F.cross_entropy(logits, y)
                text = None
            else:
                text = F.normalize(text_features(), dim=-1)
                loss = F.cross_entropy(scale * x @ text.T, y)
            if clip_text is not None and text is not None:  # KgCoOp / TCP
                loss = loss + 8.0 * (1 - F.cosine_similarity(text, clip_text, dim=-1).mean())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return epoch


def saved_bytes(fn) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def cocoop_memory(learner, chunk: int) -> dict:
    batch = learner.epoch_order(EPOCH).batch(0, learner.config.batch_size)
    encoding = learner.text_encoding(batch)

    def plain():
        with autocast(learner.device, learner.config.amp):
            text = encoding.encode(encoding.source(), 0, encoding.num_classes)
        learner.batch_losses(text, batch)

    def chunked():
        step = ChunkedTextBackward(encoding, chunk)
        learner.batch_losses(step.features(), batch)
        # The chunked backward keeps one chunk's graph at a time: measure one chunk.
        with autocast(learner.device, learner.config.amp):
            encoding.encode(encoding.source(), 0, min(chunk, encoding.num_classes))

    return {"prompts_per_step": encoding.num_classes, "chunk": chunk,
            "saved_bytes_plain": saved_bytes(plain), "saved_bytes_chunked": saved_bytes(chunked)}


def bench_model(model_name: str, args, device) -> list[dict]:
    model, _, _, tokenizer = create_model(model_name, None, device)
    dim = int(model.text_projection.shape[1])
    g = torch.Generator().manual_seed(7)
    cache = synthetic_cache(args.classes, args.shots, dim, g)
    layers = PromptTextEncoder(model).num_layers
    rows = []
    for name in args.learners:
        fields = {"batch_size": 32, "epochs": 10}
        if name == "tcp":
            fields["tcp_layer"] = min(8, layers - 1)
            fields["optimizer"] = "sgd"  # the same update on both sides
        config = TrainConfig.for_learner(name, model=model_name, amp=False, **fields)
        learner = learner_class(name)(config, cache, model, tokenizer, device)
        official = official_step_fn(learner, name)
        ours = lambda learner=learner: learner.train_epoch(epoch=EPOCH, bar=None)  # noqa: E731
        times = {"official": [], "fastprompt": []}
        official(), ours()  # warm-up
        for _ in range(args.repeats):
            for side, fn in (("official", official), ("fastprompt", ours)):
                start = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[side].append(time.perf_counter() - start)
        row = {"model": model_name, "learner": name, "classes": args.classes,
               "shots": args.shots, "batch_official": 1 if name == "cocoop" else 32,
               "batch_fastprompt": 32,
               **{f"{side}_epoch_s": statistics.median(v) for side, v in times.items()}}
        row["speedup"] = row["official_epoch_s"] / row["fastprompt_epoch_s"]
        if name == "cocoop":
            row["memory"] = cocoop_memory(learner, args.chunk)
        rows.append(row)
        print(f"{model_name} {name}: official-style {row['official_epoch_s']:.3f} s, "
              f"fastprompt {row['fastprompt_epoch_s']:.3f} s per epoch "
              f"({row['speedup']:.1f}x)", flush=True)
    return rows


def markdown(rows: list[dict], env: dict, command: str) -> str:
    lines = [f"Epoch time per learner, official-style loop vs fastprompt, on {env['cpu_model'] if env['device_type'] == 'cpu' else env['device']} "
             f"({env['threads']} threads), torch {env['torch']}, {env['timestamp']}; `{command}`.",
             "", "| model | learner | classes x shots | official-style s (batch) | "
             "fastprompt s (batch) | speed-up |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['learner']} | {r['classes']} x {r['shots']} | "
                     f"{r['official_epoch_s']:.3f} ({r['batch_official']}) | "
                     f"{r['fastprompt_epoch_s']:.3f} ({r['batch_fastprompt']}) | "
                     f"{r['speedup']:.1f}x |")
    memory = [r for r in rows if "memory" in r]
    if memory:
        lines += ["", "CoCoOp, bytes autograd keeps for one step's text side (batch 32):", "",
                  "| model | prompts per step | plain MiB | --text-chunk K | chunked MiB |",
                  "|---|---|---|---|---|"]
        for r in memory:
            m = r["memory"]
            lines.append(f"| {r['model']} | {m['prompts_per_step']} | "
                         f"{m['saved_bytes_plain'] / 2**20:.1f} | {m['chunk']} | "
                         f"{m['saved_bytes_chunked'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["fastprompt-tiny", "ViT-B-16"])
    p.add_argument("--learners", nargs="+", default=["coop", "cocoop", "kgcoop", "tcp"])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=32, help="CoCoOp's --text-chunk for the memory row")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [r for name in args.models for r in bench_model(name, args, device)]
    env = common.environment(device)
    command = "python bench/bench_learners.py " + " ".join(sys.argv[1:] if argv is None else argv)
    env["command"] = command
    print(common.write_results("learners", env, rows, markdown(rows, env, command)))
    return rows


if __name__ == "__main__":
    main()
