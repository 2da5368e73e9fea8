"""``fastprompt train``'s learner flags: --learner and --loss, --method as their shorthand, and
the learner's official defaults for the flags left out (parsed only: no training)."""
import pytest

from fastprompt.cli import build_parser
from fastprompt.cli.train import config_from


def config(*argv, shots=None):
    args = build_parser("train").parse_args(["train", "--out", "r", *argv])
    return config_from(args, shots)


def test_method_is_shorthand_for_learner_and_loss():
    assert (config().learner, config().loss) == ("coop", "ce")
    assert (config("--method", "dspt").learner, config("--method", "dspt").loss) == ("coop", "dspt")
    assert config("--learner", "coop", "--loss", "dspt") == config("--method", "dspt")
    soft = config("--method", "softcpt", "--softcpt-loss", "dspt")
    assert (soft.learner, soft.loss, soft.epochs) == ("softcpt", "dspt", 50)


@pytest.mark.parametrize("argv, match", [
    (["--method", "dspt", "--loss", "ce"], "--loss: ce contradicts --method dspt"),
    (["--method", "softcpt", "--learner", "kgcoop"], "--learner: kgcoop contradicts --method"),
])
def test_contradictions_are_refused_by_flag(argv, match):
    with pytest.raises(ValueError, match=match):
        config(*argv)


def test_a_learner_brings_its_official_defaults_and_flags_win():
    coop = config(shots=4)
    assert (coop.n_ctx, coop.epochs, coop.batch_size, coop.optimizer) == (16, 100, 32, "sgd")
    kg = config("--learner", "kgcoop")
    assert (kg.n_ctx, kg.ctx_init, kg.epochs, kg.batch_size) == (4, "a photo of a", 100, 128)
    tcp = config("--learner", "tcp", "--epochs", "3", "--kg-weight", "2")
    assert (tcp.optimizer, tcp.lr, tcp.epochs, tcp.kg_weight, tcp.tcp_layer) == (
        "adam", 0.002, 3, 2.0, 8)
    dept = config("--dept", "--dept-weight", "0.5")
    assert dept.dept and dept.dept_weight == 0.5 and dept.dept_lr_scale == 6.5
