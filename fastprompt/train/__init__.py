"""Prompt tuning over cached features: every method (CoOp, DSPT) with every plug-in (ATLaS
targets and alternation, ProGrad), run folders, resume, evaluation.

Typical use::

    config = TrainConfig(method="dspt", targets="csl", alternate=True, prograd=True, epochs=50)
    metrics = train_run(config, cache, model, tokenizer, "runs/dspt-csl")
    run = load_run("runs/dspt-csl")            # model, class names, baked text features
"""
from fastprompt.train.config import METHODS, TARGETS, TrainConfig, coop_epochs
from fastprompt.train.loop import accuracy, epoch_order, learning_rate, logit_scale
from fastprompt.train.run import Run, evaluate_run, load_run, read_prompt, train_run
from fastprompt.train.softcpt import Task, load_softcpt_run, train_softcpt_run  # SoftCPT

__all__ = ["METHODS", "TARGETS", "Run", "TrainConfig", "accuracy", "coop_epochs", "epoch_order",
           "evaluate_run", "learning_rate", "load_run", "logit_scale", "read_prompt", "train_run",
           "Task", "load_softcpt_run", "train_softcpt_run"]
