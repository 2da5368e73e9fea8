"""ATLaS instance-wise targets stay on the host (a file-backed M x C table) and each step
gathers its batch's rows: on every loss backend this trains exactly as the whole table on the
device indexed by ``sample_index`` did."""
import pytest
import torch

from fastprompt.data import instance_soft_labels
from fastprompt.train import CoOpLearner, TrainConfig, objective


@pytest.fixture(scope="module")
def setup(cached_shapes):
    """The tiny model and a 3-class shapes cache (shared: read-only)."""
    shared = cached_shapes(3, images_per_class=4, test_images_per_class=2, size=32, data_seed=2,
                           views=2, seed=1)
    return shared.model, shared.tokenizer, shared.cache


def _whole_table_on_the_device(config, cache, zeroshot):
    """The former targets: the in-memory table, moved to the device with the class-wise one."""
    return objective.Targets(instance_wise=instance_soft_labels(
        cache.train_features, cache.train_sample_index, zeroshot,
        num_samples=cache.num_train_images))


def _epoch(setup, config):
    model, tok, cache = setup
    learner = CoOpLearner(config, cache, model, tok, torch.device("cpu"))
    result = learner.train_epoch(epoch=0, bar=None)
    return result, learner.ctx.detach().clone(), learner.objective.targets.instance_wise


@pytest.mark.parametrize("backend, prograd", [("reference", True), ("cpp", False),
                                              ("cpp", True), ("triton", False)])
def test_gathered_rows_train_as_the_whole_table(setup, monkeypatch, backend, prograd):
    monkeypatch.setenv("FASTPROMPT_BACKEND", backend)
    config = TrainConfig(model="fastprompt-tiny", epochs=2, batch_size=8, n_ctx=2,
                         targets="isl", loss="dspt", prograd=prograd)
    gathered, ctx, table = _epoch(setup, config)
    assert table.device.type == "cpu"
    with monkeypatch.context() as m:
        m.setattr(objective, "make_targets", _whole_table_on_the_device)
        m.setattr(objective, "gather_soft_labels", lambda table, sample, device: sample.to(device))
        m.setattr(objective, "with_batch_soft_labels",
                  lambda options, index: {**options, "sample_index": index})
        whole, ctx_whole, whole_table = _epoch(setup, config)
    assert torch.equal(table, whole_table)
    assert gathered == whole
    assert torch.equal(ctx, ctx_whole)
