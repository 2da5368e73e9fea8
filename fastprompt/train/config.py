"""Training configuration: every method and plug-in as one validated record, saved with each run.

Defaults follow CoOp (SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, cosine schedule
with one constant warm-up epoch at 1e-5, 16 context tokens, class token at the end) and ProGrad
(λ = 1, T = 1). DSPT has no hyper-parameter. ATLaS publishes neither its period K nor its
smoothing weight; see ``--alternate-period`` and ``--smoothing`` for the defaults chosen here.
Other learners' official configs differ (CoCoOp: 4 context tokens from "a photo of a", 10
epochs; TCP: Adam, 50 epochs, ...): ``TrainConfig.for_learner`` starts from those, and each
learner's ``defaults`` says what they are.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from fastprompt._checks import check_seed
from fastprompt.data.soft_labels import DEFAULT_CSL_TEMPERATURE
from fastprompt.models.prompt_learner import CLASS_TOKEN_POSITIONS

# fastprompt 0.1's --method names (CoOp with cross-entropy, CoOp with DSPT's double softmax,
# SoftCPT), which version 1 run files record.
METHODS = ("coop", "dspt", "softcpt")
# The learners by TrainConfig.learner name: filled by fastprompt.train.learner.register as each
# learner's module is imported (fastprompt.train imports every built-in one).
LEARNERS: dict[str, type] = {}
# cross-entropy, DSPT's double softmax, PTNL's generalized cross-entropy (1 - p_y^q) / q and
# NLPrompt's mean absolute error 1 - p_y (GCE at q = 1).
LOSSES = ("ce", "dspt", "gce", "mae")
OPTIMIZERS = ("sgd", "adam")
TASK_CONTEXTS = ("shared", "per_task")
TARGETS = ("hard", "ls", "csl", "isl")
# What each field's annotation admits (a bool is no number here), and how a refusal says it.
_FIELD_TYPES = {"int": ((int,), "an int"), "float": ((int, float), "a number"),
                "bool": ((bool,), "a bool"), "str": ((str,), "a str"),
                "str | None": ((str, type(None)), "a str or null")}


def coop_epochs(shots: int | None) -> int:
    """CoOp's epoch count for a shot count: 50 for 1 shot, 100 for 2-4, 200 for 8 and more."""
    if shots is None or shots >= 8:
        return 200
    return 50 if shots <= 1 else 100


@dataclass
class TrainConfig:
    # model
    model: str = "fastprompt-tiny"
    pretrained: str | None = None
    # prompt (CoOp)
    n_ctx: int = 16
    ctx_init: str | None = None
    class_specific: bool = False
    class_token_position: str = "end"
    # learner (one CoOp prompt, or SoftCPT's meta network over tasks), loss and plug-ins
    learner: str = "coop"
    loss: str = "ce"
    gce_q: float = 0.5
    targets: str = "hard"
    smoothing: float = 0.1
    alternate: bool = False
    alternate_period: int = 2
    csl_temperature: float = DEFAULT_CSL_TEMPERATURE
    prograd: bool = False
    lam: float = 1.0
    temperature: float = 1.0
    # SoftCPT (learner "softcpt"): task context tokens, shared or per task
    n_task_ctx: int = 4
    task_ctx: str = "shared"
    # KgCoOp and TCP: w · (1 - mean_c cos(t_c, t_c^clip)), t^clip from the hand-made template
    kg_weight: float = 8.0
    kg_template: str = "a photo of a {}."
    # TCP: the text layer before which the class-aware tokens replace the context
    tcp_layer: int = 8
    # MaPLe (learner "maple"): prompts in both towers before layers 0 .. prompt_depth-1; IVLP
    # (learner "ivlp"): n_ctx text and n_ctx_vision image tokens, each tower its own depth.
    # Defaults: the official ViT-B/16 configs; a depth may not exceed the model's layers
    prompt_depth: int = 9
    n_ctx_vision: int = 2
    prompt_depth_text: int = 12
    prompt_depth_vision: int = 12
    # PromptSRC (learner "promptsrc", IVLP's prompts and depths): the run's loss plus
    # text_loss_weight · L1(text features, the frozen 60-template ones) + image_loss_weight ·
    # L1(image features, the frozen tower's) + KL(zero-shot || prompted logits); the final prompts
    # are the epochs' prompts averaged with Gaussian weights N(epoch; gpa_mean, gpa_std²)
    text_loss_weight: float = 25.0
    image_loss_weight: float = 10.0
    gpa_mean: float = 15.0
    gpa_std: float = 1.0
    # DePT (any learner): FiLM'd features into a linear head over the training classes, its
    # loss weighted by dept_weight, its parameters' learning rate lr * dept_lr_scale
    dept: bool = False
    dept_weight: float = 0.7
    dept_lr_scale: float = 6.5
    # NLPrompt (any learner): each epoch an optimal-transport split of the training images;
    # those it keeps train with the run's loss, the others with MAE. ot_reg: the transport's
    # entropic regularisation (the official scripts' 0.001)
    nlprompt: bool = False
    ot_reg: float = 0.001
    # JoAPR (any learner): after joapr_warmup epochs of the run's loss on the given labels plus
    # joapr_confidence_penalty (α₁) times the negative entropy, each epoch a two-Gaussian
    # mixture over the training images' losses splits them; kept images train on their label
    # refined by the prediction, the others on the prediction, both sharpened (joapr_temperature),
    # mixed up between images (Beta(joapr_mixup_beta, joapr_mixup_beta)), plus
    # joapr_prior_weight (α₂) times KL(uniform || mean prediction). Defaults: the official
    # scripts' config (configs/trainers/JoAPR/rn50.yaml over train.py's defaults)
    joapr: bool = False
    joapr_warmup: int = 1
    joapr_confidence_penalty: float = 0.5
    joapr_prior_weight: float = 0.5
    joapr_mixup_beta: float = 0.001
    joapr_temperature: float = 2.0
    # optimisation (CoOp)
    optimizer: str = "sgd"
    epochs: int = 50
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    seed: int = 1
    amp: bool = True

    def __post_init__(self):
        def bad(name, message):
            return ValueError(f"{name}: {message}")

        for f in dataclasses.fields(self):
            types, what = _FIELD_TYPES.get(f.type, ((object,), ""))
            value = getattr(self, f.name)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                raise TypeError(f"{f.name}: expected {what}, got {type(value).__name__} "
                                f"{value!r:.60}")
        check_seed(self.seed)
        if self.learner not in LEARNERS:
            raise bad("learner", f"must be one of {tuple(LEARNERS)}, got {self.learner!r}")
        if self.loss not in LOSSES:
            raise bad("loss", f"must be one of {LOSSES}, got {self.loss!r}")
        for name in ("gce_q", "smoothing", "csl_temperature", "lam", "temperature", "lr", "momentum",
                     "weight_decay", "warmup_lr", "kg_weight", "dept_weight", "dept_lr_scale",
                     "ot_reg", "joapr_confidence_penalty", "joapr_prior_weight",
                     "joapr_mixup_beta", "joapr_temperature", "text_loss_weight",
                     "image_loss_weight", "gpa_mean", "gpa_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad(name, f"must be a finite number, got {value!r}")
        if not 0.0 < self.gce_q <= 1.0:
            raise bad("gce_q", f"must lie in (0, 1] (0 is cross-entropy: --loss ce), got "
                      f"{self.gce_q}")
        if self.targets not in TARGETS:
            raise bad("targets", f"must be one of {TARGETS}, got {self.targets!r}")
        if self.class_token_position not in CLASS_TOKEN_POSITIONS:
            raise bad("class_token_position", f"must be one of {CLASS_TOKEN_POSITIONS}, got {self.class_token_position!r}")
        if self.n_ctx < 1:
            raise bad("n_ctx", f"must be at least 1, got {self.n_ctx}")
        if not 0.0 < self.smoothing <= 1.0:
            raise bad("smoothing", f"must lie in (0, 1], got {self.smoothing}")
        if self.alternate and self.targets == "hard":
            raise bad("alternate", "alternates hard and soft targets: pick --targets ls, csl or isl")
        if self.alternate_period < 2:
            raise bad("alternate_period", f"must be at least 2 (K-1 hard epochs, then 1 soft), got {self.alternate_period}")
        if self.csl_temperature <= 0:
            raise bad("csl_temperature", f"must be positive, got {self.csl_temperature}")
        if self.lam < 0:
            raise bad("lam", f"must be non-negative, got {self.lam}")
        if self.temperature <= 0:
            raise bad("temperature", f"must be positive, got {self.temperature}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise bad("lr", f"must be positive, got {self.lr}")
        if self.momentum < 0:
            raise bad("momentum", f"must be non-negative, got {self.momentum}")
        if self.weight_decay < 0:
            raise bad("weight_decay", f"must be non-negative, got {self.weight_decay}")
        if self.warmup_lr <= 0:
            raise bad("warmup_lr", f"must be positive, got {self.warmup_lr}")
        if self.warmup_epochs < 0:
            raise bad("warmup_epochs", f"must be non-negative, got {self.warmup_epochs}")
        if self.optimizer not in OPTIMIZERS:
            raise bad("optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.kg_weight < 0:
            raise bad("kg_weight", f"must be non-negative, got {self.kg_weight}")
        if not isinstance(self.kg_template, str) or self.kg_template.count("{}") != 1:
            raise bad("kg_template", f"must hold one '{{}}' for the class name, got "
                      f"{self.kg_template!r}")
        if isinstance(self.tcp_layer, bool) or not isinstance(self.tcp_layer, int) or self.tcp_layer < 1:
            raise bad("tcp_layer", f"must be an int >= 1, got {self.tcp_layer!r}")
        for name, low in (("prompt_depth", 1), ("n_ctx_vision", 1), ("prompt_depth_text", 1),
                          ("prompt_depth_vision", 0)):
            if getattr(self, name) < low:
                raise bad(name, f"must be at least {low}, got {getattr(self, name)}")
        for name in ("text_loss_weight", "image_loss_weight"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be non-negative, got {getattr(self, name)}")
        if self.gpa_std <= 0:
            raise bad("gpa_std", f"must be positive (the Gaussian's standard deviation in "
                      f"epochs), got {self.gpa_std}")
        if not 0.0 <= self.dept_weight <= 1.0:
            raise bad("dept_weight", f"must lie in [0, 1], got {self.dept_weight}")
        if self.dept_lr_scale <= 0:
            raise bad("dept_lr_scale", f"must be positive, got {self.dept_lr_scale}")
        if self.ot_reg <= 0:
            raise bad("ot_reg", f"must be positive, got {self.ot_reg}")
        if self.nlprompt and self.loss in ("gce", "mae"):
            raise bad("nlprompt", f"NLPrompt chooses each image's loss (the run's loss on the "
                      f"images it keeps, MAE on the others): combine it with loss ce or dspt, "
                      f"not {self.loss}")
        self._check_joapr(bad)
        if self.task_ctx not in TASK_CONTEXTS:
            raise bad("task_ctx", f"must be one of {TASK_CONTEXTS}, got {self.task_ctx!r}")
        if self.n_task_ctx < 1:
            raise bad("n_task_ctx", f"must be at least 1, got {self.n_task_ctx}")
        if self.learner == "softcpt" and self.class_specific:
            raise bad("class_specific", "SoftCPT generates one context per task (its meta network's "
                      "output); class-specific contexts are not supported")
        if self.learner == "softcpt" and self.ctx_init is not None:
            raise bad("ctx_init", "SoftCPT's class-prompt context comes from its meta network; "
                      "there is no phrase to initialise")

    def _check_joapr(self, bad) -> None:
        """JoAPR's settings, and the plug-ins it does not combine with (each named)."""
        if self.joapr_warmup < 0:
            raise bad("joapr_warmup", f"must be non-negative, got {self.joapr_warmup}")
        for name in ("joapr_confidence_penalty", "joapr_prior_weight"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be non-negative, got {getattr(self, name)}")
        for name in ("joapr_mixup_beta", "joapr_temperature"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if not self.joapr:
            return
        if self.joapr_warmup >= self.epochs:
            raise bad("joapr_warmup", f"{self.joapr_warmup} warm-up epochs leave none of the "
                      f"{self.epochs} epochs to JoAPR's split: lower joapr_warmup or raise epochs")
        if self.nlprompt:
            raise bad("joapr", "JoAPR and NLPrompt each split the training images their own way "
                      "and set each image's loss; pick one (--joapr or --nlprompt)")
        if self.loss in ("gce", "mae"):
            raise bad("joapr", f"JoAPR trains soft cross-entropy on refined, mixed targets; "
                      f"{self.loss} on a soft target is no loss JoAPR defines (MAE's, linear in "
                      f"the prediction, is minimised by the target's top class alone, so it "
                      f"discards the refinement): combine it with loss ce or dspt")
        if self.targets != "hard":
            raise bad("joapr", f"JoAPR makes each image's soft target itself; ATLaS's "
                      f"{self.targets!r} targets would replace them: use targets 'hard'")
        if self.dept:
            raise bad("joapr", "DePT's head trains with cross-entropy on each image's given "
                      "label, which JoAPR's refined and mixed targets do not reach: drop "
                      "--dept or --joapr")

    @property
    def double_softmax(self) -> bool:
        return self.loss == "dspt"

    @property
    def method(self) -> str:
        """The method's name: CoOp's by its loss (``coop``, ``dspt``, ``gce`` as PTNL trains
        it, ``mae``), else the learner's (as fastprompt 0.1 recorded ``softcpt``)."""
        if self.learner == "coop":
            return "coop" if self.loss == "ce" else self.loss
        return self.learner

    def soft_epoch(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) trains on soft targets.

        ATLaS alternates in blocks of K epochs: K-1 epochs on one-hot labels, then one on soft
        labels (Chen et al. 2025, Sec. 3); without ``alternate`` a soft target kind is used in
        every epoch.
        """
        if self.targets == "hard":
            return False
        if not self.alternate:
            return True
        return (epoch + 1) % self.alternate_period == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_learner(cls, learner: str, **fields) -> "TrainConfig":
        """The config of ``learner`` with its official defaults (the learner's ``defaults``:
        context length and initialisation, epochs, batch size, optimiser, ...) where ``fields``
        does not set them."""
        if learner not in LEARNERS:
            raise ValueError(f"learner: must be one of {tuple(LEARNERS)}, got {learner!r}")
        return cls(learner=learner, **{**LEARNERS[learner].defaults, **fields})

    @classmethod
    def from_dict(cls, d: dict, *, format_version: int | None = None) -> "TrainConfig":
        """The config of ``to_dict``, as a run folder stores it. A ``format_version`` entry of
        ``d`` (config.json has one), else the argument (the version of the file the config
        came from), else 1 says which fields to expect: version 1 configs (fastprompt 0.1) may
        use ``method``/``softcpt_loss`` instead of ``learner``/``loss``."""
        if not isinstance(d, dict):
            raise ValueError(f"config: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("format_version", format_version if format_version is not None else 1)
        if version == 1:
            d = _upgrade_v1(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"config: unknown fields {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        """A short name for tables, the method then its plug-ins: 'dspt+isl(alt)+prograd',
        'kgcoop(gce)+dept'."""
        name = self.method
        if self.learner != "coop" and self.loss != "ce":
            name += f"({self.loss})"
        if self.targets != "hard":
            name += f"+{self.targets}" + ("(alt)" if self.alternate else "")
        for plugin in ("prograd", "dept", "nlprompt", "joapr"):
            if getattr(self, plugin):
                name += f"+{plugin}"
        return name


def _upgrade_v1(d: dict) -> dict:
    """A version 1 config dict in today's fields: 0.1.0 wrote ``method`` (coop|dspt|softcpt),
    ``softcpt_loss`` (coop|dspt) and an unused ``extra``; later version 1 files have today's."""
    if "method" not in d and "softcpt_loss" not in d and "extra" not in d:
        return d
    d = dict(d)
    method = d.pop("method", "coop")
    softcpt_loss = d.pop("softcpt_loss", "coop")
    if d.pop("extra", None):
        raise ValueError("config: field 'extra' is no longer supported")
    if method not in METHODS:
        raise ValueError(f"config: method must be one of {METHODS}, got {method!r}")
    d.setdefault("learner", "softcpt" if method == "softcpt" else "coop")
    uses_dspt = method == "dspt" or (method == "softcpt" and softcpt_loss == "dspt")
    d.setdefault("loss", "dspt" if uses_dspt else "ce")
    return d
