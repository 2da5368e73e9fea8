"""A CoOp-style prompt run (CoOp or DSPT loss, every plug-in) on one feature cache: train it into
a run folder (``fastprompt.train.rundir``) and load it back.

The prompt file holds the learned context ``ctx`` and, in its metadata, the class names.
"""
from __future__ import annotations

import os

import torch

from fastprompt.data.cache import FeatureCache
from fastprompt.models.weights import model_weights_hash
from fastprompt.train import rundir
from fastprompt.train.chunked_text_backward import coop_encoding
from fastprompt.train.class_sharding import local_text_chunk, sharded_text_features
from fastprompt.train.config import TrainConfig
from fastprompt.train.distributed import world_size
from fastprompt.train.loop import _autocast, accuracy, logit_scale, make_targets, train_epoch

FORMAT = "fastprompt-run-1"


def _prompted_model(model, tokenizer, classnames, config: TrainConfig):
    from fastprompt.models import PromptedTextModel
    return PromptedTextModel(model, tokenizer, list(classnames), n_ctx=config.n_ctx,
                             ctx_init=config.ctx_init, class_specific=config.class_specific,
                             class_token_position=config.class_token_position)


class PromptLearnerRun:
    """``rundir.Learner`` for one CoOp-style prompt on one cache."""
    format = FORMAT

    def __init__(self, config: TrainConfig, cache: FeatureCache, model, tokenizer, device,
                 compile: bool = False, text_chunk: int = 0):
        from fastprompt.models import zeroshot_text_features
        self.config, self.cache, self.model, self.device = config, cache, model, device
        torch.manual_seed(config.seed)  # the random context initialisation
        self.prompted = _prompted_model(model, tokenizer, cache.classnames, config).to(device)
        self.text_chunk = local_text_chunk(text_chunk, coop_encoding(self.prompted), device,
                                           lambda: _autocast(device, config.amp))
        self.ctx = self.prompted.prompt_learner.ctx
        self.optimizer = torch.optim.SGD([self.ctx], lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay)
        self.zeroshot = zeroshot_text_features(model, tokenizer, cache.classnames).to(device)
        self.targets = make_targets(config, cache, self.zeroshot).to(device)
        self.images_per_epoch = cache.num_train_images
        self.compiled = None
        if compile:
            from fastprompt.train.compiled_step import CompiledStep
            self.compiled = CompiledStep(self.prompted, self.optimizer, config,
                                         self.zeroshot if config.prograd else None, device)

    def trainable_state(self) -> dict:
        return {"ctx": self.ctx}

    def load_trainable_state(self, state: dict) -> None:
        with torch.no_grad():
            self.ctx.copy_(state["ctx"])

    def train_epoch(self, epoch: int, bar) -> dict:
        return train_epoch(self.prompted, self.model, self.cache, self.config, self.targets,
                           self.optimizer, epoch,
                           self.zeroshot if self.config.prograd else None, self.device, bar=bar,
                           compiled=self.compiled, text_chunk=self.text_chunk)

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """All C class text features, float32 (under several ranks each encodes its slice: every
        rank calls this, as every rank computes the epoch's metrics)."""
        if world_size() > 1:
            return sharded_text_features(coop_encoding(self.prompted)).float()
        return self.prompted().float()

    def train_accuracy(self) -> dict:
        """Train accuracy on the first augmented view of each image, clean and noisy labels."""
        text = self.text_features()
        m = self.cache.num_train_images
        first_view = self.cache.train_features[:m]
        return {"train_acc_noisy": accuracy(first_view, self.cache.train_labels[:m], text),
                "train_acc_clean": accuracy(first_view, self.cache.train_clean_labels[:m], text)}

    def prompt_fields(self) -> dict:
        return {"classnames": list(self.cache.classnames)}


def train_run(config: TrainConfig, cache: FeatureCache, model, tokenizer, out_dir, *,
              resume: bool = False, progress: bool | None = None,
              device: str | torch.device | None = None, data: dict | None = None,
              compile: bool = False, text_chunk: int = 0) -> dict:
    """Train ``config`` on ``cache`` into ``out_dir`` and return the metrics (also written to
    ``out_dir/metrics.json``; ``data``, where the cache's images came from, is recorded there as
    given: ``fastprompt.data.source.DataSource.to_dict``).

    ``model`` is the frozen open_clip model the cache was built with. With ``resume=True`` an
    existing checkpoint in ``out_dir`` is continued (it must come from the same config, cache and
    model); without it, a folder that already holds a checkpoint is refused rather than
    overwritten.

    ``compile=True`` runs each training step compiled as one graph
    (``fastprompt.train.compiled_step``; CUDA graphs on CUDA): the same training to float32
    rounding, faster where Python overhead dominates. Not part of the run's identity (a run
    resumes with or without it); ``metrics["compile"]`` records the mode (None without).
    ``text_chunk`` K > 0 runs the text backward K classes at a time (exact, memory bounded by K
    prompts; ``fastprompt.train.chunked_text_backward``); ``"auto"`` measures the activations
    per class prompt and takes the plain backward when all classes fit in half the device's free
    memory, else the largest K that does (``metrics["text_chunk"]``). Not part of the run's
    identity either, so a run may resume with another K. The two do not combine.

    Under a ``torch.distributed`` process group of several ranks (``torchrun``), every rank calls
    this with the same arguments: the classes are sharded over the ranks
    (``fastprompt.train.class_sharding``; ``compile`` is refused), rank 0 alone writes
    ``out_dir``, and every rank returns the metrics. The number of ranks is not part of the
    run's identity: a run resumes on any number of them.
    """
    from fastprompt.models import count_parameters
    from fastprompt.train.chunked_text_backward import check_text_chunk

    if config.learner != "coop":
        raise ValueError("config: learner 'softcpt' trains several tasks: use "
                         "fastprompt.train.train_softcpt_run")
    text_chunk = check_text_chunk(text_chunk)
    if compile and text_chunk:  # "auto" too: it may choose chunks
        raise ValueError("text_chunk: the chunked text backward does not run inside the compiled "
                         "step; drop compile (--compile) or text_chunk (--text-chunk)")
    if compile and world_size() > 1:
        # The compiled step is one graph over all C classes, for small C where Python overhead
        # dominates; sharding is for large C, where the text encoder dominates.
        raise ValueError(f"compile: the compiled step (--compile) runs all classes in one "
                         f"process; it does not combine with class sharding over "
                         f"{world_size()} ranks (torchrun): drop --compile, or run one process")
    out_dir = os.fspath(out_dir)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(cache.classnames) < 2:
        raise ValueError("cache: needs at least two classes to train a classifier")
    identity = {"config": config.to_dict(), "cache": cache.fingerprint,
                "model_weights": model_weights_hash(model)}
    rundir.refuse_existing_run(out_dir, resume, FORMAT)  # before any work
    model = model.to(device)
    learner = PromptLearnerRun(config, cache, model, tokenizer, device, compile=compile,
                               text_chunk=text_chunk)

    def finish(history: list) -> dict:
        text = learner.text_features()
        return {
            **rundir.run_metrics(config, history, device),
            "compile": learner.compiled.mode if learner.compiled is not None else None,
            "zeroshot_test_acc": accuracy(cache.test_features, cache.test_labels, learner.zeroshot),
            "test_acc": accuracy(cache.test_features, cache.test_labels, text),
            "val_acc": accuracy(cache.val_features, cache.val_labels, text),
            "trainable_parameters": count_parameters(learner.prompted),
            "logit_scale": float(logit_scale(model)),
            "text_chunk": learner.text_chunk,
            "text_chunk_auto": text_chunk == "auto",
            "num_classes": cache.num_classes,
            "num_train_images": cache.num_train_images,
            "views": cache.views,
            "cache": {"path": os.path.abspath(cache.path), "fingerprint": cache.fingerprint},
            **({"data": data} if data is not None else {}),
        }

    return rundir.train_epochs(out_dir, config, learner, identity, resume=resume,
                               progress=progress, device=device,
                               desc=f"train {config.describe()}", finish=finish)


def _load(prompt: rundir.PromptFile, run_dir: str, model, preprocess_val, tokenizer, device,
          tasks) -> list[rundir.Run]:
    config, ctx = prompt.config, prompt.tensors["ctx"]
    classnames = prompt.field("classnames")
    prompted = _prompted_model(model, tokenizer, classnames, config).to(device)
    if tuple(prompted.prompt_learner.ctx.shape) != tuple(ctx.shape):
        raise ValueError(f"run: prompt shape {tuple(ctx.shape)} does not match the config")
    with torch.no_grad():
        prompted.prompt_learner.ctx.copy_(ctx)
        text = prompted().float()
    return [rundir.Run(run_dir, config, model, tokenizer, config.model, classnames, text,
                       float(logit_scale(model)), rundir.method_summary(config),
                       preprocess_val)]


def read_prompt(run_dir) -> tuple[torch.Tensor, TrainConfig, list, dict]:
    """``(ctx, config, classnames, metadata)`` from a CoOp-style run's prompt file."""
    prompt = rundir.read_prompt_file(run_dir)
    if prompt.format != FORMAT:
        raise ValueError(f"run: {prompt.path!r} is a {prompt.format!r} prompt, not a "
                         "CoOp-style one (use load_run)")
    return prompt.tensors["ctx"], prompt.config, prompt.field("classnames"), prompt.metadata


rundir.register_format(rundir.RunFormat(FORMAT, tasks=lambda prompt: None, load=_load))
