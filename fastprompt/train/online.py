"""Online learners: the image tower runs in every step (MaPLe, IVLP, PromptSRC;
docs/online_learners.md).

Their learned tokens sit inside the image tower, so the image features change with every step
and no feature cache can serve them. What they share is here:

* ``OnlineData``: a data set's training split as the feature cache would train on it (the
  few-shot draw and the label noise of a ``CacheSpec``, the same functions, the same seed), its
  test and validation splits, and the fingerprint that names the data in the run's identity;
* ``EpochImages``: the epoch's training images, decoded and augmented in ``DataLoader``
  workers. Epoch ``e`` visits the images in ``epoch_image_order(seed, e, M)`` and draws image
  ``m``'s augmentation from torch's generator seeded with ``view_seed(seed, m, e)`` inside the
  item (the cache draws view ``v`` of image ``m`` from ``view_seed(seed, m, v)``: epoch ``e``
  sees the view a cache would hold as view ``e``). Every draw is a function of (seed, epoch,
  image) alone, not of the worker that decodes it nor of the epochs before, so a resumed run
  sees the same images as an uninterrupted one with any ``--workers``;
* ``OnlineLearner``: the ``Learner`` of a prompt module (``MaPLePrompts``, ``IVLPPrompts``)
  whose epoch is a loop over those images; the loss goes through the shared fused op with the
  run's loss and target options (``loss_options``), the optimiser, the learning-rate schedule
  and the epoch's record through ``fastprompt.train.epoch.optimise_epoch``, the checkpoint,
  resume and run files through ``fit``.
"""
from __future__ import annotations

import abc
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastprompt.data.cache.encode import ImageViews, open_rgb
from fastprompt.data.cache.spec import CacheSpec, view_seed
from fastprompt.data.folders import DatasetSplits
from fastprompt.models import create_model, zeroshot_text_features
from fastprompt.models.weights import model_weights_hash
from fastprompt.train.config import LEARNERS, TrainConfig
from fastprompt.train.distributed import world_size
from fastprompt.train.epoch import SHUFFLE_STREAM, logit_scale, optimise_epoch
from fastprompt.train.files import PromptFile, read_prompt_file, refuse_existing_run
from fastprompt.train.fit import fit
from fastprompt.train.learner import (EpochOrder, Learner, TrainedClassifier, learner_class,
                                      method_summary, resolve_device)
from fastprompt.train.objective import fused_losses, loss_options, make_targets

# Images per forward pass of the test and validation splits.
EVAL_BATCH_SIZE = 64


def epoch_image_order(seed: int, epoch: int, num_images: int) -> Tensor:
    """The training images of epoch ``epoch`` in the order it visits them: the permutation the
    cached learners draw for the epoch (``fastprompt.train.epoch.epoch_order``'s)."""
    g = torch.Generator().manual_seed(seed * SHUFFLE_STREAM + epoch)
    return torch.randperm(num_images, generator=g)


class OnlineData:
    """The images an online run trains and is tested on. ``spec`` is the ``CacheSpec`` of the
    same arguments (one view): its ``train`` (the few-shot draw) and ``noisy_labels`` (the
    label noise) are what a cached run of these arguments trains on, and its fingerprint is
    the data's identity (what a checkpoint resumes against)."""

    def __init__(self, model: nn.Module, model_name: str, preprocess_train, preprocess_val,
                 splits: DatasetSplits, *, shots: int | None = None, noise_rate: float = 0.0,
                 noise_type: str = "symmetric", noise_per_class: int | None = None,
                 seed: int = 1):
        self.spec = CacheSpec(model, model_name, preprocess_train, preprocess_val, splits,
                              views=1, shots=shots, noise_rate=noise_rate, noise_type=noise_type,
                              noise_per_class=noise_per_class, seed=seed)
        self.splits = splits
        self.classnames = list(splits.classnames)
        self.train_paths = [p for p, _ in self.spec.train]
        self.clean_labels = torch.tensor([y for _, y in self.spec.train], dtype=torch.long)
        self.train_labels = torch.tensor(self.spec.noisy_labels, dtype=torch.long)
        self.seed = seed
        self.fingerprint = self.spec.fingerprint()

    @property
    def num_train_images(self) -> int:
        return len(self.train_paths)

    def epoch_images(self, epoch: int) -> "EpochImages":
        spec = self.spec
        return EpochImages(self.train_paths, self.train_labels, self.clean_labels,
                           spec.preprocess_train, self.seed, epoch, spec.flip_added)

    def eval_images(self, split: str) -> tuple[ImageViews, Tensor]:
        """``(dataset, labels)`` of the test or validation split: one plain view per image
        (``preprocess_val``), as the cache encodes them."""
        samples = getattr(self.splits, split)
        return (ImageViews([p for p, _ in samples], self.spec.preprocess_val, "preprocess_val",
                           1, None, False),
                torch.tensor([y for _, y in samples], dtype=torch.long))


class EpochImages(ImageViews):
    """Item ``i``: ``(image, given label, clean label)`` of the ``i``-th image epoch ``epoch``
    visits, augmented with the draw seeded by ``(seed, image, epoch)`` (module docstring)."""

    def __init__(self, paths, labels: Tensor, clean_labels: Tensor, transform, seed: int,
                 epoch: int, flip: bool):
        super().__init__(paths, transform, "preprocess_train", 1, seed, flip)
        self.labels, self.clean_labels, self.epoch = labels, clean_labels, epoch
        self.order = epoch_image_order(seed, epoch, len(paths))

    def __getitem__(self, i: int):
        m = int(self.order[i])
        img = open_rgb(self.paths[m])
        # The transform draws from torch's global generator: seed it per (image, epoch) and
        # leave the caller's (the worker's) generator state untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, m, self.epoch))
            x = self._apply(img)
        return x, self.labels[m], self.clean_labels[m]


def image_loader(dataset, batch_size: int, workers: int, device: torch.device):
    """The dataset in order, in batches of ``batch_size`` (the last may be short), decoded in
    ``workers`` processes, pinned for a CUDA device."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(0))  # else it draws its base seed globally


class ImageOrder(EpochOrder):
    """An epoch's training images, in the order it visits them."""

    def __init__(self, images: EpochImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """``(images, given labels)`` of the epoch's images ``start:stop`` (what
        ``batch_losses`` takes; ``train_epoch`` reads them through a loader instead)."""
        items = [self.images[i] for i in range(start, stop)]
        return torch.stack([x for x, _, _ in items]), torch.stack([y for _, y, _ in items])


# What an online learner refuses, and why (docs/online_learners.md lists them).
_REFUSED = {
    "prograd": "ProGrad's KL term needs the zero-shot logits of the same augmented images, a "
               "second image-tower pass per step that is not implemented",
    "dept": "DePT's head trains on fixed image features",
    "nlprompt": "NLPrompt splits the training images each epoch by their cached features",
    "joapr": "JoAPR splits and mixes the training images by their cached features",
    "class_specific": "the prompts are shared by every class, as in the official code",
}


class OnlineLearner(Learner):
    """A learner whose prompts run in both towers: a ``prompts`` module (``MaPLePrompts``,
    ``IVLPPrompts``) whose ``state_dict`` names are the official ones, trained on images.

    ``workers``: ``DataLoader`` processes that decode and augment the images (not part of the
    run's identity)."""

    def __init__(self, config: TrainConfig, data: OnlineData, model, tokenizer,
                 device: torch.device, *, workers: int = 0):
        self.check_config(config)
        if len(data.classnames) < 2:
            raise ValueError("data: needs at least two classes to train a classifier")
        if data.num_train_images == 0:
            raise ValueError("data: the training split holds no images")
        self.config, self.data, self.model, self.device = config, data, model, device
        self.tokenizer, self.workers = tokenizer, workers
        self.check_depths(config, model)
        torch.manual_seed(config.seed)  # the prompts' random initialisation
        self.prompts = self.build_prompts(config, model, tokenizer, data.classnames).to(device)
        self.zeroshot = zeroshot_text_features(model, tokenizer, data.classnames).to(device)
        self.targets = make_targets(config, None, self.zeroshot).to(device)
        self.scale = logit_scale(model).to(device)
        self.optimizer = self.make_optimizer()
        self.text_chunk = 0
        self.images_per_epoch = data.num_train_images
        self._train_acc = {"train_acc_noisy": float("nan"), "train_acc_clean": float("nan")}

    # -- what a subclass says

    @classmethod
    @abc.abstractmethod
    def build_prompts(cls, config: TrainConfig, model, tokenizer, classnames) -> nn.Module:
        """The learner's prompt module for ``config`` over ``classnames`` (its initial tensors
        drawn from the global generator)."""

    @classmethod
    @abc.abstractmethod
    def depths(cls, config: TrainConfig) -> list[tuple[str, str, int]]:
        """The config's prompt depths: ``(field, tower, depth)``, tower "text" or "image"."""

    # -- checks

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Refuse, by name, what does not combine with an online learner."""
        for field, why in _REFUSED.items():
            if getattr(config, field):
                raise ValueError(f"{field}: not supported with --learner {cls.name}: {why}")
        if config.targets == "isl":
            raise ValueError(f"targets: 'isl' (ATLaS instance-wise soft labels) is not supported "
                             f"with --learner {cls.name}: the table is computed from cached "
                             "image features, which change with the prompts here; use 'ls' or "
                             "'csl'")
        if config.class_token_position != "end":
            raise ValueError(f"class_token_position: --learner {cls.name} puts the class name "
                             f"after the prompt ('end'), as the official code; got "
                             f"{config.class_token_position!r}")

    @classmethod
    def check_depths(cls, config: TrainConfig, model) -> None:
        """A depth above the tower's layer count is refused naming the field (never clamped)."""
        layers = {"text": len(model.transformer.resblocks),
                  "image": len(model.visual.transformer.resblocks)}
        for field, tower, depth in cls.depths(config):
            if depth > layers[tower]:
                flag = "--" + field.replace("_", "-")
                raise ValueError(f"{field}: {depth} exceeds the {layers[tower]} layers of "
                                 f"{config.model}'s {tower} tower (the official default is for "
                                 f"ViT-B/16's 12); pass {flag} {layers[tower]} or less")

    # -- what is trained, saved and loaded

    def trainable(self) -> dict[str, nn.Parameter]:
        return dict(self.prompts.named_parameters())

    def identity(self) -> dict:
        return {"config": self.config.to_dict(), "data": self.data.fingerprint,
                "model_weights": model_weights_hash(self.model)}

    def prompt_fields(self) -> dict:
        return {"classnames": list(self.data.classnames)}

    @classmethod
    def task_names(cls, prompt: PromptFile) -> None:
        return None

    @classmethod
    def load_classifiers(cls, prompt, run_dir, model, preprocess_val, tokenizer, device,
                         tasks) -> list[TrainedClassifier]:
        raise ValueError(f"run: {run_dir!r} is a {cls.name!r} run, whose prompts live inside the "
                         "image tower; loading it as a classifier over plain image features "
                         f"(eval, load_run) is not supported for --learner {cls.name} yet (its "
                         "metrics.json holds the test accuracy; export bakes the prompts into "
                         "the exported image tower)")

    # -- one epoch

    def epoch_order(self, epoch: int) -> ImageOrder:
        return ImageOrder(self.data.epoch_images(epoch))

    def text_encoding(self, batch):
        raise NotImplementedError(f"{self.name}: the text side runs inside the online step "
                                  "(no chunked or sharded text backward)")

    def batch_losses(self, text: Tensor, batch) -> tuple[Tensor, None]:
        """``(loss, None)`` of ``batch`` (``(images, labels)`` on the device) against the class
        text features ``text`` (C x E), with epoch 0's loss options."""
        images, labels = batch
        images = images.to(self.device)
        return self.step_losses(images, text, self.prompts.image_features(images),
                                labels.to(self.device), 0)

    def step_losses(self, images: Tensor, text: Tensor, features: Tensor, labels: Tensor,
                    epoch: int):
        """A training batch's ``(loss, None)``: ``text`` (C x E) and ``features`` (B x E) are the
        prompted towers' outputs for ``images`` (B x 3 x H x W). The run's loss (``losses``);
        PromptSRC adds its self-regulating terms, which need the images themselves."""
        return self.losses(text, features, labels, epoch)

    def losses(self, text: Tensor, image_features: Tensor, labels: Tensor, epoch: int):
        options = loss_options(self.config, self.targets, epoch)
        return fused_losses(image_features, text, labels, self.scale, self.config, options, None)

    def train_epoch(self, *, epoch: int, bar) -> dict:
        """One epoch over the images: per batch both prompted towers forward, the fused loss,
        the backward through both and the optimiser's step."""
        config, device = self.config, self.device
        images = self.data.epoch_images(epoch)
        batches = iter(image_loader(images, config.batch_size, self.workers, device))
        correct = torch.zeros(2, dtype=torch.long, device=device)

        def batch_loss(start, stop):
            x, labels, clean = next(batches)
            if x.shape[0] != stop - start:  # the loader and the loop cut the epoch alike
                raise RuntimeError(f"batch of {x.shape[0]} images, expected {stop - start}")
            x = x.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            clean = clean.to(device, non_blocking=True)
            text, features = self.prompts(x)
            with torch.no_grad():  # train accuracy on the batch, before its step
                pred = (F.normalize(features.detach().float(), dim=-1)
                        @ F.normalize(text.detach().float(), dim=-1).t()).argmax(1)
                correct[0] += (pred == labels).sum()
                correct[1] += (pred == clean).sum()
            return self.step_losses(x, text, features, labels, epoch)

        result = optimise_epoch(config, self.optimizer, list(self.trainable().values()), epoch,
                                len(images), batch_loss, device, bar)
        n = len(images)
        self._train_acc = {"train_acc_noisy": int(correct[0]) / n,
                           "train_acc_clean": int(correct[1]) / n}
        return result

    # -- metrics

    def train_accuracy(self) -> dict:
        """The last epoch's accuracy on its own augmented batches, each taken before its step
        (no extra pass over the images)."""
        return dict(self._train_acc)

    @torch.no_grad()
    def split_accuracies(self, split: str) -> tuple[float, float]:
        """``(prompted, zero-shot)`` top-1 accuracy on the test or validation split (NaN when
        it holds no image)."""
        dataset, labels = self.data.eval_images(split)
        if len(dataset) == 0:
            return float("nan"), float("nan")
        text = F.normalize(self.prompts.text_features().float(), dim=-1)
        correct = torch.zeros(2, dtype=torch.long)
        for x, index in image_loader(dataset, EVAL_BATCH_SIZE, self.workers, self.device):
            x = x[:, 0].to(self.device, non_blocking=True)
            y = labels[index]
            prompted = F.normalize(self.prompts.image_features(x).float(), dim=-1)
            plain = self.model.encode_image(x.to(self.model.visual.conv1.weight.dtype))
            plain = F.normalize(plain.float(), dim=-1)
            correct[0] += int(((prompted @ text.t()).argmax(1).cpu() == y).sum())
            correct[1] += int(((plain @ self.zeroshot.float().t()).argmax(1).cpu() == y).sum())
        return int(correct[0]) / len(dataset), int(correct[1]) / len(dataset)

    def final_metrics(self) -> dict:
        test_acc, zeroshot_test_acc = self.split_accuracies("test")
        val_acc, _ = self.split_accuracies("val")
        return {"test_acc": test_acc, "zeroshot_test_acc": zeroshot_test_acc, "val_acc": val_acc,
                "trainable_parameters": sum(p.numel() for p in self.trainable().values()),
                "num_classes": len(self.data.classnames),
                "num_train_images": self.data.num_train_images,
                "num_test_images": len(self.data.splits.test),
                "data_fingerprint": self.data.fingerprint, "workers": self.workers}


class BakedPromptTower(nn.Module):
    """The prompted image tower with its prompts fixed (buffers): images (B x 3 x H x W) to
    image features (B x E), what an export puts in the graph. It carries the tower's
    ``preprocess_cfg``, ``image_size`` and ``output_dim``."""

    def __init__(self, prompts: nn.Module, model):
        super().__init__()
        with torch.no_grad():
            first, deep = prompts.vision_prompts()
        self.encoder = prompts.vision_encoder
        self.register_buffer("prompts", None if first is None else first.detach().clone())
        self.deep_layers = sorted(deep)
        for i in self.deep_layers:
            self.register_buffer(f"deep_{i}", deep[i].detach().clone())
        visual = model.visual
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
        self.image_size = visual.image_size
        self.output_dim = getattr(visual, "output_dim", None)

    def forward(self, images: Tensor) -> Tensor:
        deep = {i: getattr(self, f"deep_{i}") for i in self.deep_layers}
        return self.encoder(images, self.prompts, deep or None)


class BakedPromptModel(nn.Module):
    """A model whose ``visual`` is a ``BakedPromptTower`` (what ``export_onnx`` takes)."""

    def __init__(self, visual: BakedPromptTower):
        super().__init__()
        self.visual = visual


def load_online_run(run_dir, device: str | torch.device = "cpu",
                    classnames: list[str] | None = None) -> dict:
    """A finished online run, for export: ``model`` (a ``BakedPromptModel``: the run's model
    weights, checked, with the trained image prompts fixed in its tower), ``text_features``
    (C x E, float32, the trained text prompts'), ``class_names``, ``scale``, ``model_name``,
    ``method`` and ``config``. ``classnames``: the trained prompts in front of these names
    instead (none of MaPLe's or IVLP's tensors belongs to a class)."""
    run_dir = os.fspath(run_dir)
    prompt = read_prompt_file(run_dir)
    if not is_online(prompt.learner):
        raise ValueError(f"run: {run_dir!r} is a {prompt.learner!r} run, not an online one")
    config = prompt.config
    model, _, _, tokenizer = create_model(config.model, config.pretrained, device)
    if prompt.metadata.get("model_weights") != model_weights_hash(model):
        raise ValueError(f"run: the weights of model {config.model!r} (pretrained="
                         f"{config.pretrained!r}) differ from those the prompt in {run_dir!r} "
                         "was trained with")
    method = method_summary(config)
    if classnames is None:
        classnames = prompt.field("classnames")
    else:
        method = {**method, "classnames_transferred": True}
    cls = learner_class(prompt.learner)
    with torch.random.fork_rng(devices=[]):  # the initial draw is overwritten
        prompts = cls.build_prompts(config, model, tokenizer, classnames)
    prompts.load_state_dict(prompt.tensors)
    prompts.to(torch.device(device))
    with torch.no_grad():
        text = prompts.text_features().float()
    return {"model": BakedPromptModel(BakedPromptTower(prompts, model)), "text_features": text,
            "class_names": list(classnames), "scale": float(logit_scale(model)),
            "model_name": config.model, "method": method, "config": config}


def is_online(learner: str) -> bool:
    """Whether the learner named ``learner`` trains online (runs the image tower per step)."""
    cls = LEARNERS.get(learner)
    return isinstance(cls, type) and issubclass(cls, OnlineLearner)


def train_online_run(config: TrainConfig, data: OnlineData, model, tokenizer, out_dir, *,
                     resume: bool = False, progress: bool | None = None,
                     device: str | torch.device | None = None, workers: int = 0,
                     record: dict | None = None) -> dict:
    """Train ``config``'s online learner (MaPLe, IVLP, PromptSRC) on ``data`` into ``out_dir``;
    return the metrics (also in ``out_dir/metrics.json``; ``record``, where the images came
    from, is recorded there as given). ``resume``: continue the checkpoint in ``out_dir`` (same
    config, data and model); without it a folder holding a checkpoint is refused. One process
    only (no sample sharding under torchrun yet)."""
    cls = learner_class(config.learner)
    if not issubclass(cls, OnlineLearner):
        raise ValueError(f"config: learner {config.learner!r} trains on cached features, not "
                         "online (use train_run)")
    if world_size() > 1:
        raise ValueError(f"learner: {config.learner} trains in one process; sharding its images "
                         f"over {world_size()} ranks (torchrun) is not supported yet")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: must be an int >= 0, got {workers!r}")
    out_dir = os.fspath(out_dir)
    device = resolve_device(device)
    refuse_existing_run(out_dir, resume, cls.name)  # before any work
    learner = cls(config, data, model.to(device), tokenizer, device, workers=workers)
    return fit(learner, out_dir, resume=resume, progress=progress, data=record)
