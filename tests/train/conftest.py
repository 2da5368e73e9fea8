"""Fixtures of the training tests."""
import pytest


@pytest.fixture
def interrupt_at_epoch(monkeypatch):
    """``interrupt(learner_class, epoch)``: from then on, training that class raises
    KeyboardInterrupt when it starts ``epoch`` (the epochs before are finished and
    checkpointed); ``monkeypatch.undo()`` lets it run again."""
    def interrupt(learner_class, epoch):
        real_epoch = learner_class.train_epoch

        def interrupted(self, *, epoch: int, bar):
            if epoch == stop_at:
                raise KeyboardInterrupt
            return real_epoch(self, epoch=epoch, bar=bar)

        stop_at = epoch
        monkeypatch.setattr(learner_class, "train_epoch", interrupted)

    return interrupt
