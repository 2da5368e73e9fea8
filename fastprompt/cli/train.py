"""``fastprompt train``: tune a prompt on cached features, every learner with every loss and
plug-in; under ``torchrun`` with several processes, each one a rank of one run with the classes
sharded over them (``fastprompt.train.distributed``)."""
from __future__ import annotations

import argparse
import os

from fastprompt.cli import common
from fastprompt.cli.types import int_at_least
from fastprompt.data import load_cache
from fastprompt.data.cache import load_cache_for, task_cache_path
from fastprompt.data.tasks import load_task_datasets, read_tasks_file, task_specs_from_folders
from fastprompt.train import (LEARNERS, LOSSES, METHODS, TARGETS, Task, TrainConfig, coop_epochs,
                              train_run, train_softcpt_run)
from fastprompt.train.config import OPTIMIZERS
from fastprompt.train.class_sharding import shard_bounds
from fastprompt.train.distributed import DEFAULT_TIMEOUT_S, torchrun_process_group, world_size
from fastprompt.train.files import refuse_existing_run
from fastprompt.train.online import OnlineData, is_online, train_online_run


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = p.add_argument_group("method (every learner takes every loss and plug-in)")
    g.add_argument("--learner", choices=tuple(LEARNERS), default=None,
                   help="the prompt learner (default: coop); its official config sets the "
                   "defaults of --n-ctx, --ctx-init, --epochs, --batch-size, --lr, --optimizer")
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help="ce: cross-entropy (default); dspt: DSPT's double softmax; gce: PTNL's "
                   "generalized cross-entropy (1 - p^q)/q; mae: 1 - p (GCE with q = 1)")
    g.add_argument("--gce-q", type=float, default=d.gce_q,
                   help="GCE's exponent q in (0, 1] (default: %(default)s, PTNL's)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="shorthand: coop (--learner coop), dspt (--learner coop --loss dspt), "
                   "softcpt (--learner softcpt)")
    g.add_argument("--targets", choices=TARGETS, default=d.targets,
                   help="hard, ls (label smoothing), csl/isl (ATLaS class-/instance-wise soft labels)")
    g.add_argument("--smoothing", type=float, default=d.smoothing, help="weight of the soft part (default: %(default)s)")
    g.add_argument("--alternate", action="store_true",
                   help="ATLaS: K-1 epochs on hard labels, then one on soft targets, repeated")
    g.add_argument("--alternate-period", type=int, default=d.alternate_period, help="ATLaS K (default: %(default)s)")
    g.add_argument("--csl-temperature", type=float, default=d.csl_temperature,
                   help="softmax temperature of the class-wise table (default: %(default)s)")
    g.add_argument("--prograd", action="store_true", help="ProGrad gradient projection")
    g.add_argument("--lam", type=float, default=d.lam, help="ProGrad lambda (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=d.temperature, help="ProGrad KL temperature")
    g.add_argument("--kg-weight", type=float, default=d.kg_weight,
                   help="KgCoOp, TCP: weight of the distance to the hand-made prompt's features "
                   "(default: %(default)s)")
    g.add_argument("--kg-template", default=d.kg_template,
                   help="KgCoOp, TCP: the hand-made prompt, e.g. 'a photo of a {}, a type of pet.' "
                   "(default: %(default)r)")
    g.add_argument("--tcp-layer", type=int, default=d.tcp_layer,
                   help="TCP: the text layer before which its class-aware tokens replace the "
                   "context (default: %(default)s)")
    g.add_argument("--prompt-depth", type=int, default=None,
                   help="MaPLe: layers of both towers that take prompts (official: 9; at most "
                   "the model's layers)")
    g.add_argument("--n-ctx-vision", type=int, default=None,
                   help="IVLP, PromptSRC: image prompt tokens (official: 2, 4; --n-ctx sets the "
                   "text ones)")
    g.add_argument("--prompt-depth-text", type=int, default=None,
                   help="IVLP, PromptSRC: text layers that take prompts (official: 12, 9)")
    g.add_argument("--prompt-depth-vision", type=int, default=None,
                   help="IVLP, PromptSRC: image layers that take prompts (official: 12, 9; 0: "
                   "none)")
    g.add_argument("--text-loss-weight", type=float, default=None,
                   help="PromptSRC: weight of the L1 distance of the text features to the frozen "
                   "60-template ones (official: 25)")
    g.add_argument("--image-loss-weight", type=float, default=None,
                   help="PromptSRC: weight of the L1 distance of the image features to the "
                   "frozen tower's (official: 10)")
    g.add_argument("--gpa-mean", type=float, default=None,
                   help="PromptSRC: the epoch (1-based) at the centre of the Gaussian prompt "
                   "average's weights (official: 15 of 20 epochs)")
    g.add_argument("--gpa-std", type=float, default=None,
                   help="PromptSRC: the Gaussian prompt average's width in epochs (official: 1)")
    g.add_argument("--dept", action="store_true",
                   help="DePT: FiLM'd features into a linear head over the training classes, "
                   "trained beside the prompt; base classes fuse both at test")
    g.add_argument("--dept-weight", type=float, default=d.dept_weight,
                   help="DePT: the head's share of the loss and of the fused logits "
                   "(default: %(default)s)")
    g.add_argument("--dept-lr-scale", type=float, default=d.dept_lr_scale,
                   help="DePT: the head's learning rate is --lr times this (default: %(default)s)")
    g.add_argument("--nlprompt", action="store_true",
                   help="NLPrompt: each epoch an optimal-transport split of the training images; "
                   "those it keeps train with the loss, the others with MAE")
    g.add_argument("--ot-reg", type=float, default=d.ot_reg,
                   help="NLPrompt: the transport's entropic regularisation (default: %(default)s, "
                   "the official scripts')")
    g.add_argument("--joapr", action="store_true",
                   help="JoAPR: after a warm-up, each epoch a two-Gaussian split of the training "
                   "images by loss; kept images train on refined labels, the others on sharpened "
                   "predictions, mixed up in feature space, with a uniform-prior penalty")
    g.add_argument("--joapr-warmup", type=int, default=d.joapr_warmup,
                   help="JoAPR: warm-up epochs on the given labels (default: %(default)s; "
                   "per-data-set values in docs/label_noise.md)")
    g.add_argument("--joapr-confidence-penalty", type=float, default=d.joapr_confidence_penalty,
                   help="JoAPR: weight of the warm-up's negative-entropy penalty, the README's "
                   "alpha1 (default: %(default)s)")
    g.add_argument("--joapr-prior-weight", type=float, default=d.joapr_prior_weight,
                   help="JoAPR: weight of KL(uniform || mean prediction) after warm-up, the "
                   "README's alpha2 (default: %(default)s, the official config's)")
    g.add_argument("--joapr-mixup-beta", type=float, default=d.joapr_mixup_beta,
                   help="JoAPR: the mixup's Beta(b, b) parameter (default: %(default)s)")
    g.add_argument("--joapr-temperature", type=float, default=d.joapr_temperature,
                   help="JoAPR: targets are sharpened to p^T / sum p^T (default: %(default)s)")
    g = p.add_argument_group("prompt (defaults: CoOp's, or --learner's official config)")
    g.add_argument("--n-ctx", type=int, default=None, help=f"context tokens (CoOp: {d.n_ctx})")
    g.add_argument("--ctx-init", default=None, help='initial phrase, e.g. "a photo of a"')
    g.add_argument("--class-specific", action="store_true", help="one context per class (CSC)")
    g.add_argument("--class-token-position", choices=("end", "middle", "front"), default="end")
    g = p.add_argument_group("optimisation (defaults: CoOp's, or --learner's official config)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"SGD with momentum or Adam (CoOp: {d.optimizer})")
    g.add_argument("--epochs", type=int, default=None,
                   help="CoOp: its count for --shots (50/100/200; 200 without --shots)")
    g.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help=f"(CoOp: {d.batch_size})")
    g.add_argument("--lr", type=float, default=None, help=f"(CoOp: {d.lr})")
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs)
    g.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--text-chunk", type=text_chunk, default=0, metavar="K",
                   help="exact low-memory text backward: re-encode the class prompts K at a time "
                        "(one extra text forward; memory of K prompts, not all C); 0: plain "
                        "backward (default); auto: the plain backward when all classes fit in "
                        "half the free memory, else the largest K that does. Not part of the "
                        "run's identity")


def text_chunk(value: str):
    if value == "auto":
        return value
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"expected classes per chunk (an int >= 0) or 'auto', "
                                         f"got {value!r}")
    return number


def add_softcpt_args(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    g = parser.add_argument_group("SoftCPT (--method softcpt: several tasks, one meta network)")
    g.add_argument("--tasks", metavar="TASKS.json",
                   help='tasks file: [{"name": ..., "data": DIR, "split_file": FILE?}, ...] '
                        "(or give --data once per task)")
    g.add_argument("--task-names", nargs="+", metavar="NAME",
                   help="task names for several --data folders (default: the folder names)")
    g.add_argument("--n-task-ctx", type=int, default=d.n_task_ctx,
                   help="learnable task context tokens before each task name (default: %(default)s)")
    g.add_argument("--task-ctx", choices=("shared", "per-task"), default="shared",
                   help="one task context for all tasks, or one per task (default: %(default)s)")
    g.add_argument("--softcpt-loss", choices=("coop", "dspt"), default="coop",
                   help="the per-task loss: cross-entropy or DSPT's double softmax (default: %(default)s)")


# Flags whose default is the learner's official config (else CoOp's).
LEARNER_DEFAULTED = ("n_ctx", "ctx_init", "epochs", "batch_size", "lr", "optimizer",
                     "prompt_depth", "n_ctx_vision", "prompt_depth_text", "prompt_depth_vision",
                     "text_loss_weight", "image_loss_weight", "gpa_mean", "gpa_std")


def learner_and_loss(args) -> tuple[str, str]:
    """``(learner, loss)`` from ``--learner``/``--loss`` and their shorthand ``--method`` (with
    SoftCPT's ``--softcpt-loss``); contradictory flags are refused by name."""
    if args.method is None:
        learner = args.learner or ("softcpt" if args.tasks else "coop")
        loss = args.loss or ("dspt" if learner == "softcpt" and args.softcpt_loss == "dspt"
                             else "ce")
        return learner, loss
    learner = "softcpt" if args.method == "softcpt" else "coop"
    loss = "dspt" if args.method == "dspt" or (
        learner == "softcpt" and args.softcpt_loss == "dspt") else "ce"
    if args.learner is not None and args.learner != learner:
        raise ValueError(f"--learner: {args.learner} contradicts --method {args.method} (learner "
                         f"{learner}); give one of them")
    if args.loss is not None and args.loss != loss:
        raise ValueError(f"--loss: {args.loss} contradicts --method {args.method} (loss {loss}); "
                         "give one of them")
    return learner, loss


def config_from(args, shots: int | None) -> TrainConfig:
    """The TrainConfig of ``train``'s arguments: the learner's official defaults (CoOp's epoch
    count for ``shots``), then every flag given."""
    learner, loss = learner_and_loss(args)
    given = {k: getattr(args, k) for k in LEARNER_DEFAULTED if getattr(args, k) is not None}
    return TrainConfig.for_learner(
        learner, **{"epochs": coop_epochs(shots), **LEARNERS[learner].defaults, **given},
        model=args.model, pretrained=os.path.abspath(args.pretrained) if args.pretrained else None,
        class_specific=args.class_specific, class_token_position=args.class_token_position,
        loss=loss, gce_q=args.gce_q, targets=args.targets, smoothing=args.smoothing,
        alternate=args.alternate,
        alternate_period=args.alternate_period, csl_temperature=args.csl_temperature,
        prograd=args.prograd, lam=args.lam, temperature=args.temperature,
        n_task_ctx=args.n_task_ctx, task_ctx=args.task_ctx.replace("-", "_"),
        kg_weight=args.kg_weight, kg_template=args.kg_template, tcp_layer=args.tcp_layer,
        dept=args.dept, dept_weight=args.dept_weight, dept_lr_scale=args.dept_lr_scale,
        nlprompt=args.nlprompt, ot_reg=args.ot_reg, joapr=args.joapr,
        joapr_warmup=args.joapr_warmup, joapr_confidence_penalty=args.joapr_confidence_penalty,
        joapr_prior_weight=args.joapr_prior_weight, joapr_mixup_beta=args.joapr_mixup_beta,
        joapr_temperature=args.joapr_temperature,
        momentum=args.momentum, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, seed=args.seed, amp=not args.no_amp)


def cmd_train(args) -> None:
    with torchrun_process_group(args.device, args.dist_timeout) as device:
        args.device = device
        learner = learner_and_loss(args)[0]
        if learner == "softcpt":
            train_softcpt(args)
        elif is_online(learner):
            train_online(args)
        else:
            train_coop(args)


def train_coop(args) -> None:
    """Every learner over one feature cache (all but SoftCPT)."""
    learner = learner_and_loss(args)[0]
    if args.tasks:
        raise ValueError(f"--tasks: training several tasks is SoftCPT's; add --method softcpt "
                         f"(got --learner {learner})")
    if len(getattr(args, "data_all", None) or []) > 1:
        raise ValueError("--data: given several times; several folders train together only "
                         "with --method softcpt")
    from_cache = bool(args.cache and not args.data)
    if from_cache and args.subsample != "all":
        raise ValueError("--subsample: takes the classes of --data DIR; give --data (a cache "
                         "built with --subsample can be named with --cache alongside it)")
    if from_cache:  # CoOp's epoch count follows the cache's shots
        shots = load_cache(args.cache, verify=False).fingerprint.get("shots")
        if args.shots is not None and args.shots != shots:
            raise ValueError(f"--shots: {args.cache} holds {shots or 'all'} shots per class, "
                             f"not {args.shots}")
    else:
        shots = args.shots
    config = config_from(args, shots)
    # Training from a built cache never encodes an image: the image tower is not loaded.
    model, pt, pv, tokenizer, device = common.load_model(args, image_tower=not from_cache)
    if from_cache:
        cache = load_cache_for(args.cache, model, args.model)
    else:
        # Under torchrun every rank encodes its share of the cache's chunks (through files).
        path = args.cache or os.path.join(args.out, "features.safetensors")
        cache = common.build_cache(args, path, model, pt, pv,
                                   show_progress=None if common.is_writer() else False)
    sizes = [b - a for a, b in shard_bounds(cache.num_classes, world_size())]
    common.print_ranks(f"{cache.num_classes} classes: {' + '.join(map(str, sizes))} per rank")
    metrics = train_run(config, cache, model, tokenizer, args.out, resume=args.resume,
                        device=device, progress=common.progress(args), compile=args.compile,
                        text_chunk=args.text_chunk,
                        data=None if from_cache else common.data_source(args).to_dict())
    if not common.is_writer():
        return
    common.finish_run(args.out)
    print(f"{metrics['method']}: test accuracy {metrics['test_acc']:.4f} "
          f"(zero-shot {metrics['zeroshot_test_acc']:.4f}), median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")


def train_online(args) -> None:
    """``fastprompt train --learner maple|ivlp|promptsrc``: the image tower runs in every step,
    on the images of ``--data`` (decoded and augmented by ``--workers`` processes); no feature
    cache. What does not combine is refused by name before any work."""
    learner = learner_and_loss(args)[0]
    for flag, given, why in (
            ("--cache", args.cache, "its image features change with the prompts: it trains on "
             "the images of --data"),
            ("--compile", args.compile, "the compiled step takes cached features"),
            ("--text-chunk", args.text_chunk, "the chunked text backward is for the cached "
             "learners' text side"),
            ("--tasks", args.tasks, "several tasks are SoftCPT's"),
            ("--data", len(getattr(args, "data_all", None) or []) > 1,
             "given several times; one folder per run")):
        if given:
            raise ValueError(f"{flag}: not supported with --learner {learner}: {why}")
    if world_size() > 1:
        raise ValueError(f"--learner: {learner} trains in one process; sharding its images over "
                         f"{world_size()} ranks (torchrun) is not supported yet")
    if not args.data:
        raise ValueError(f"--data: --learner {learner} trains on an image folder")
    common.check_noise_args(args)
    config = config_from(args, args.shots)
    cls = LEARNERS[learner]
    cls.check_config(config)  # before the model is loaded
    refuse_existing_run(args.out, args.resume, learner)
    model, pt, pv, tokenizer, device = common.load_model(args)
    cls.check_depths(config, model)  # before the images are listed and hashed
    source = common.data_source(args)
    splits = source.load(shots=args.shots)
    common.print_classes(splits.classnames)
    data = OnlineData(model, args.model, pt, pv, splits, shots=args.shots,
                      noise_rate=args.noise_rate, noise_type=args.noise_type,
                      noise_per_class=args.noise_per_class, seed=args.seed)
    metrics = train_online_run(config, data, model, tokenizer, args.out, resume=args.resume,
                               device=device, progress=common.progress(args),
                               workers=args.workers, record=source.to_dict())
    common.finish_run(args.out)
    print(f"{metrics['method']}: test accuracy {metrics['test_acc']:.4f} "
          f"(zero-shot {metrics['zeroshot_test_acc']:.4f}), median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")


def train_softcpt(args) -> None:
    """``fastprompt train --method softcpt``: read and check every task, then cache each task's
    features under ``OUT/features/`` and train. Bad input writes nothing."""
    if args.compile:
        raise ValueError("--compile: not supported with --method softcpt (its batches mix tasks "
                         "in proportions that change every step, so no one graph fits); it "
                         "compiles --method coop and dspt steps")
    folders = getattr(args, "data_all", None) or ([args.data] if args.data else [])
    if args.tasks and folders:
        raise ValueError("--tasks: give the tasks either in a tasks file or as --data folders, "
                         "not both")
    if args.cache:
        raise ValueError("--cache: SoftCPT keeps one feature cache per task in OUT/features/")
    if args.split_file:
        raise ValueError("--split-file: with SoftCPT, name each task's split file in the tasks "
                         "file (\"split_file\")")
    if args.subsample != "all":
        raise ValueError("--subsample: SoftCPT trains on whole tasks; base-to-new applies to "
                         "--method coop and dspt")
    if args.tasks:
        if args.task_names:
            raise ValueError("--task-names: the tasks file names its tasks")
        specs = read_tasks_file(args.tasks)
    elif folders:
        specs = task_specs_from_folders(folders, args.task_names)
    else:
        raise ValueError("--tasks: SoftCPT needs tasks: --tasks TASKS.json, or --data once per task")
    splits = load_task_datasets(specs, test_fraction=args.test_fraction, seed=args.seed)
    config = config_from(args, args.shots)
    # Checked before any cache is written: a damaged or CoOp checkpoint is refused here already.
    refuse_existing_run(args.out, args.resume, "softcpt")
    model, pt, pv, tokenizer, device = common.load_model(args)
    tasks = []
    for i, (spec, split) in enumerate(zip(specs, splits)):
        cache = common.build_cache(args, task_cache_path(args.out, i, spec.name), model, pt, pv,
                                   splits=split, where=f" in task {spec.name!r}",
                                   show_progress=common.progress(args))
        tasks.append(Task(spec.name, cache))
    common.print_ranks(f"each batch's classes (those of its tasks, up to "
                       f"{sum(t.cache.num_classes for t in tasks)}) split evenly over them")
    metrics = train_softcpt_run(config, tasks, model, tokenizer, args.out, resume=args.resume,
                                device=device, progress=common.progress(args),
                                text_chunk=args.text_chunk)
    if not common.is_writer():
        return
    common.finish_run(args.out)
    for t in metrics["tasks"]:
        print(f"  {t['name']}: test accuracy {t['test_acc']:.4f} (zero-shot "
              f"{t['zeroshot_test_acc']:.4f}), {t['num_classes']} classes")
    print(f"{metrics['method']} over {len(tasks)} tasks: average test accuracy "
          f"{metrics['test_acc']:.4f} (zero-shot {metrics['zeroshot_test_acc']:.4f}), "
          f"{metrics['trainable_parameters']} trained parameters, median epoch "
          f"{metrics['epoch_seconds_median'] * 1e3:.1f} ms; run in {args.out}")


COMMANDS = ("train",)


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="tune a prompt on cached features")
    common.add_model_args(p)
    common.add_data_args(p)
    add_train_args(p)
    p.add_argument("--cache", metavar="FILE",
                   help="feature cache (built or reused; default: OUT/features.safetensors)")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--compile", action="store_true",
                   help="compile each training step as one graph (torch.compile; CUDA graphs on "
                   "CUDA): faster steps after a compilation of a minute or so; same result to "
                   "float32 rounding; a run resumes with or without it")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or lines")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun with several processes (the classes sharded over them): "
                        "how long a rank waits for the others before it fails (default: "
                        "%(default)s)")
    add_softcpt_args(p)
    p.set_defaults(func=cmd_train)
