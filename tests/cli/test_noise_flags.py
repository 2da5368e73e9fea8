"""--noise-per-class on ``cache`` and ``train``: the per-class protocol's cache, recorded in the
cache's fingerprint and the run's metrics.json; bad values and the two protocols together are
refused naming the flags, with nothing written."""
import collections
import json

import pytest

from fastprompt.cli import main
from fastprompt.data import load_cache


def _wrong_labels(cache):
    m = cache.num_train_images
    pairs = zip(cache.train_clean_labels[:m].tolist(), cache.train_labels[:m].tolist())
    return [(y, z) for y, z in pairs if y != z]


def test_cache_and_train_with_per_class_noise(cli_args, tmp_path, capsys):
    """cli_world's 3 classes of 4 training images: 2 wrong labels in each, each class's label
    on 2 images of other classes."""
    path = tmp_path / "c.safetensors"
    assert main(["cache", *cli_args, "--noise-per-class", "2", "--out", str(path)]) == 0
    cache = load_cache(path)
    assert cache.fingerprint["noise_per_class"] == 2 and cache.fingerprint["noise_rate"] == 0.0
    wrong = _wrong_labels(cache)
    assert collections.Counter(y for y, _ in wrong) == {0: 2, 1: 2, 2: 2}
    assert collections.Counter(z for _, z in wrong) == {0: 2, 1: 2, 2: 2}

    run = tmp_path / "run"
    assert main(["train", *cli_args, "--noise-per-class", "2", "--out", str(run), "--epochs", "1",
                 "--n-ctx", "2", "--no-progress"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cache"]["fingerprint"] == cache.fingerprint
    assert "noise" not in json.dumps(metrics["data"])  # where the data is, not its labels
    capsys.readouterr()


@pytest.mark.parametrize("value", ["-1", "1.5", "two"])
def test_a_bad_count_is_refused_by_the_flag(cli_args, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["cache", *cli_args, "--out", str(tmp_path / "c.safetensors"),
              f"--noise-per-class={value}"])
    assert e.value.code == 2
    assert (f"fastprompt cache: error: argument --noise-per-class: expected an int >= 0, got "
            f"{value!r}" in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["cache", "train"])
def test_both_noise_protocols_together_are_refused(cli_args, tmp_path, capsys, command):
    out = tmp_path / ("c.safetensors" if command == "cache" else "run")
    assert main([command, *cli_args, "--out", str(out), "--noise-per-class", "1",
                 "--noise-rate", "0.25"]) == 2
    assert (f"fastprompt {command}: error: --noise-per-class: one label-noise protocol at a "
            "time, got --noise-per-class 1 and --noise-rate 0.25" in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_more_noisy_labels_than_a_class_has_images(cli_args, tmp_path, capsys):
    assert main(["cache", *cli_args, "--out", str(tmp_path / "c.safetensors"),
                 "--noise-per-class", "3", "--shots", "2"]) == 2
    assert ("error: noise_per_class: 3 noisy labels per class requested, but class "
            in capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
