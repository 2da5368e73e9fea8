"""Prompt tuning over cached features: every learner (CoOp's prompt, SoftCPT's meta network)
with every loss (cross-entropy, DSPT) and plug-in (ATLaS targets and alternation, ProGrad), run
folders, resume, evaluation.

Typical use::

    config = TrainConfig(loss="dspt", targets="csl", alternate=True, prograd=True, epochs=50)
    metrics = train_run(config, cache, model, tokenizer, "runs/dspt-csl")
    run = load_run("runs/dspt-csl")            # model, class names, baked text features
"""
from fastprompt.train.config import LEARNERS, LOSSES, METHODS, TARGETS, TrainConfig, coop_epochs
from fastprompt.train.loop import accuracy, epoch_order, learning_rate, logit_scale
from fastprompt.train.rundir import (NonFiniteTrainingError, Run, RunMismatchError, evaluate_run,
                                     load_run, load_runs)
from fastprompt.train.run import read_prompt, train_run
from fastprompt.train.softcpt import Task, load_softcpt_run, train_softcpt_run

__all__ = ["LEARNERS", "LOSSES", "METHODS", "NonFiniteTrainingError", "Run", "RunMismatchError",
           "TARGETS", "Task", "TrainConfig", "accuracy", "coop_epochs", "epoch_order",
           "evaluate_run", "learning_rate", "load_run", "load_runs", "load_softcpt_run",
           "logit_scale", "read_prompt", "train_run", "train_softcpt_run"]
