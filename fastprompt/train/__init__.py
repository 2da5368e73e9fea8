"""Prompt tuning over cached features: every learner (CoOp's context, SoftCPT's meta network)
with every loss (cross-entropy, DSPT) and plug-in (ATLaS targets and alternation, ProGrad),
through one loop (``fit``) into resumable run folders, and finished runs loaded back.

Typical use::

    config = TrainConfig(loss="dspt", targets="csl", alternate=True, prograd=True, epochs=50)
    metrics = train_run(config, cache, model, tokenizer, "runs/dspt-csl")
    clf = load_run("runs/dspt-csl")            # model, class names, baked text features

A learner is a ``Learner`` subclass in one module (``coop.py``, ``softcpt.py``), registered
under its ``TrainConfig.learner`` name; docs/design.md describes the interface.
"""
from fastprompt.train import cocoop, coop, ivlp, kgcoop, maple, promptsrc, softcpt, tcp  # noqa: F401  (each registers its learner)
from fastprompt.train.config import LEARNERS, LOSSES, METHODS, TARGETS, TrainConfig, coop_epochs
from fastprompt.train.cocoop import CoCoOpLearner
from fastprompt.train.coop import CoOpLearner, read_prompt, train_run
from fastprompt.train.ivlp import IVLPLearner
from fastprompt.train.kgcoop import KgCoOpLearner
from fastprompt.train.maple import MaPLeLearner
from fastprompt.train.online import OnlineData, OnlineLearner, train_online_run
from fastprompt.train.promptsrc import PromptSRCLearner
from fastprompt.train.epoch import accuracy, epoch_order, learning_rate, logit_scale
from fastprompt.train.files import RunMismatchError
from fastprompt.train.fit import NonFiniteTrainingError, fit
from fastprompt.train.learner import Learner, TrainedClassifier, register
from fastprompt.train.runs import load_run, load_runs
from fastprompt.train.softcpt import SoftCPTLearner, Task, load_softcpt_run, train_softcpt_run
from fastprompt.train.tcp import TCPLearner

__all__ = ["CoCoOpLearner", "CoOpLearner", "IVLPLearner", "KgCoOpLearner", "MaPLeLearner",
           "OnlineData", "OnlineLearner", "PromptSRCLearner", "LEARNERS", "LOSSES", "Learner", "METHODS", "NonFiniteTrainingError",
           "RunMismatchError", "SoftCPTLearner", "TARGETS", "TCPLearner", "Task", "TrainConfig",
           "TrainedClassifier", "accuracy", "coop_epochs", "epoch_order", "fit",
           "learning_rate", "load_run", "load_runs", "load_softcpt_run", "logit_scale",
           "read_prompt", "register", "train_online_run", "train_run", "train_softcpt_run"]
