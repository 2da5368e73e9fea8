"""Fixtures of the training tests."""
import pytest

from testlib import stop_training_at


@pytest.fixture
def interrupt_at_epoch(monkeypatch):
    """``interrupt(learner_class, epoch)``: from then on, training that class raises
    KeyboardInterrupt when it starts ``epoch`` (the epochs before are finished and
    checkpointed); ``monkeypatch.undo()`` lets it run again."""
    return lambda learner_class, epoch: stop_training_at(learner_class, epoch, monkeypatch.setattr)
