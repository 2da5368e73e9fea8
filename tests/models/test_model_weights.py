"""The model weights hash (fastprompt.models.weights): remembered for a model loaded from a file,
computed again when the file changes."""
import os
import shutil

from fastprompt.models import create_model, model_weights_hash
from fastprompt.models import weights as weights_module


def test_weights_hash_is_remembered_by_file_size_and_mtime(tmp_path, tiny_weights, monkeypatch):
    """A model loaded from a file is hashed once per (file, size, mtime, name, precision);
    a touched file is hashed again (issue 14, item 20)."""
    monkeypatch.setenv("FASTPROMPT_CACHE_DIR", str(tmp_path / "memo"))
    weights = tmp_path / "w.safetensors"
    shutil.copy(tiny_weights, weights)
    model = create_model("fastprompt-tiny", str(weights))[0]
    first = model_weights_hash(model)
    assert (tmp_path / "memo" / "weights-hashes.json").exists()
    calls = []
    real = weights_module.update_tensor_hash
    monkeypatch.setattr(weights_module, "update_tensor_hash",
                        lambda *a: (calls.append(1), real(*a)))
    again = create_model("fastprompt-tiny", str(weights))[0]
    assert model_weights_hash(again) == first and calls == []
    os.utime(weights, ns=(1, 1))
    touched = create_model("fastprompt-tiny", str(weights))[0]
    assert model_weights_hash(touched) == first and calls  # recomputed, same weights
    plain = create_model("fastprompt-tiny")[0]   # no file: always computed
    calls.clear()
    assert model_weights_hash(plain) == first and calls
