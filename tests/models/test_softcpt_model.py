"""SoftCPT's text side on the random tiny model: the meta network's output and gradients, the
generated context feeding CoOp's class prompts, task isolation, and bad input."""
from __future__ import annotations

import pytest
import torch

from fastprompt.models import (MetaNet, PromptedTextModel, PromptTextEncoder,
                               SoftCPTModel, count_parameters,
                               softcpt_parameter_count)

TASKS = ("flower species", "pet_breeds", "aircraft models")
CLASSES = (["rose", "tulip", "sun flower"],
           ["tabby cat", "golden retriever", "pug", "sphynx"],
           ["boeing 747", "airbus a380"])


def make(tiny_text, **kw):
    model, tok = tiny_text
    torch.manual_seed(0)
    kw.setdefault("n_ctx", 6)
    return SoftCPTModel(model, tok, TASKS, CLASSES, **kw)


def test_meta_net_shape_init_and_gradient():
    torch.manual_seed(0)
    net = MetaNet(48, 5, 32)
    assert tuple(net.weight.shape) == (48, 5 * 32)
    assert abs(net.weight.std().item() - 0.02) < 0.002 and abs(net.weight.mean().item()) < 0.002
    x = torch.randn(3, 48, dtype=torch.float64)
    out = net(x)
    assert out.shape == (3, 5, 32) and out.dtype == torch.float64
    # The context of task t is row t of x @ W, reshaped: check against the product itself.
    torch.testing.assert_close(out[1], (x[1] @ net.weight.double()).reshape(5, 32))
    g = torch.randn(3, 5, 32, dtype=torch.float64)
    (out * g).sum().backward()
    torch.testing.assert_close(net.weight.grad.double(), x.T @ g.reshape(3, -1))
    with pytest.raises(ValueError, match="task_features: expected 48 columns"):
        net(torch.randn(2, 47))
    with pytest.raises(ValueError, match="n_ctx: expected a positive int"):
        MetaNet(48, 0, 32)


@pytest.mark.parametrize("task_ctx", ["shared", "per_task"])
def test_shapes_parameters_and_count(tiny_text, task_ctx):
    net = make(tiny_text, task_ctx=task_ctx, n_task_ctx=3)
    feats = net()
    assert [tuple(f.shape) for f in feats] == [(3, 64), (4, 64), (2, 64)]
    assert tuple(net.contexts().shape) == (3, 6, 64)
    assert tuple(net.task_features().shape) == (3, 64)
    rows = 3 if task_ctx == "per_task" else 1
    assert tuple(net.task_prompt.ctx.reshape(rows, 3, 64).shape) == (rows, 3, 64)
    counts = softcpt_parameter_count(net)
    assert counts == {"task_ctx": rows * 3 * 64, "meta_net": 64 * 6 * 64,
                      "total": rows * 3 * 64 + 64 * 6 * 64, "coop_one_prompt_per_task": 3 * 6 * 64}
    assert count_parameters(net) == counts["total"]
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"task_prompt.ctx", "meta_net.weight"}
    # Gradients reach both trained tensors and nothing else.
    sum(f.square().sum() for f in feats).backward()
    assert net.task_prompt.ctx.grad.abs().sum() > 0 and net.meta_net.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in net.named_parameters() if n not in trainable)


def test_initialisation_draws_only_task_context_then_meta_net(tiny_text):
    """The same seed gives the same trained tensors whatever the classes are."""
    model, tok = tiny_text
    a = make(tiny_text)
    torch.manual_seed(0)
    b = SoftCPTModel(model, tok, TASKS, [["x", "y"], ["z", "w"], ["u", "v"]], n_ctx=6)
    for key in ("task_ctx", "meta_weight"):
        assert torch.equal(a.trainable_state()[key], b.trainable_state()[key])
    torch.manual_seed(0)
    ctx = torch.empty(4, 64)
    torch.nn.init.normal_(ctx, std=0.02)
    assert torch.equal(a.task_prompt.ctx, ctx)  # official init: N(0, 0.02²), n_task_ctx x width


def test_generated_context_is_coops_prompt(tiny_text):
    """Task t's class features are CoOp's prompted text model run with the generated context,
    and the task feature is the text encoder on "ctx ctx ctx ctx <task name>."."""
    model, tok = tiny_text
    net = make(tiny_text)
    with torch.no_grad():
        torch.nn.init.normal_(net.meta_net.weight, std=0.2)
        ctx = net.contexts()
        together = net()
        for t in range(3):
            coop = PromptedTextModel(model, tok, CLASSES[t], n_ctx=6)
            torch.testing.assert_close(coop(ctx=ctx[t]), together[t], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(net([t])[0], together[t], rtol=1e-5, atol=1e-5)
        encoder = PromptTextEncoder(model)
        expected = encoder(net.task_prompt(), net.task_prompt.tokenized_prompts)
        torch.testing.assert_close(net.task_features(), expected)
        assert net.task_names == ("flower species", "pet breeds", "aircraft models")
        # By name, in any order.
        b, a = net(["aircraft models", "Flower_Species"])
        torch.testing.assert_close(a, together[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b, together[2], rtol=1e-5, atol=1e-5)


def test_task_loss_reaches_only_its_own_task_context(tiny_text):
    """With one task context per task, task A's loss moves A's context and the shared meta
    network, never task B's context; task B's class features carry no gradient from it."""
    net = make(tiny_text, task_ctx="per_task")
    feats = net([0, 1])
    feats[1].retain_grad()
    feats[0].square().sum().backward()
    grad = net.task_prompt.ctx.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0 and grad[2].abs().sum() == 0
    assert net.meta_net.weight.grad.abs().sum() > 0
    assert feats[1].grad is None


def test_load_trainable_state_round_trip_and_errors(tiny_text):
    a, b = make(tiny_text), make(tiny_text)
    with torch.no_grad():
        a.meta_net.weight.add_(1.0)
    b.load_trainable_state({k: v.detach().clone() for k, v in a.trainable_state().items()})
    torch.testing.assert_close(b()[1], a()[1])
    with pytest.raises(ValueError, match="state: missing"):
        b.load_trainable_state({"task_ctx": a.task_prompt.ctx})
    with pytest.raises(ValueError, match="state: meta_weight has shape"):
        b.load_trainable_state({"task_ctx": a.task_prompt.ctx, "meta_weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("kw, match", [
    (dict(task_names=["a", "A"]), "task_names: 'a' and 'A' are the same task name"),
    (dict(task_names=["a", "b_c", "b c"]), "same task name"),
    (dict(task_names=["a", ""], task_classnames=[["x", "y"], ["x", "y"]]), "non-empty string"),
    (dict(task_classnames=[["x", "y"], ["only"], ["x", "y"]]), "task 'pet breeds' needs at least two"),
    (dict(task_classnames=[["x", "y"]]), "one list of class names per task"),
    (dict(task_ctx="global"), "task_ctx: must be one of"),
    (dict(n_task_ctx=0), "n_task_ctx: expected an int >= 1"),
])
def test_bad_input(tiny_text, kw, match):
    model, tok = tiny_text
    args = dict(task_names=list(TASKS), task_classnames=list(CLASSES))
    args.update(kw)
    if "task_classnames" not in kw and len(args["task_names"]) != 3:
        args["task_classnames"] = [["x", "y"]] * len(args["task_names"])
    names, classes = args.pop("task_names"), args.pop("task_classnames")
    with pytest.raises(ValueError, match=match):
        SoftCPTModel(model, tok, names, classes, **args)
    net = make(tiny_text)
    with pytest.raises(ValueError, match="tasks: no task named 'cars'"):
        net(["cars"])
    with pytest.raises(ValueError, match=r"tasks: expected task indices in \[0, 3\)"):
        net([3])
