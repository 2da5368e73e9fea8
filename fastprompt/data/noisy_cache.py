"""Label-noise variants of a feature cache without re-encoding: the image features of a training
set do not depend on its labels, so a sweep over noise rates encodes each (data, model, shots,
seed, views) once and derives one cache file per noise rate and type from it.

A derived file is exactly what ``build_or_load_cache`` would have written for those arguments:
the same tensors except ``train_labels`` (drawn by ``add_label_noise`` with the same seed), and
the fingerprint ``cache_fingerprint`` gives for them; so ``build_or_load_cache`` and the
command line reuse it as their own.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from fastprompt._io import atomic_write
from fastprompt.data.cache import (CACHE_FORMAT, FeatureCache, cache_fingerprint, cache_lock,
                                   load_cache)
from fastprompt.data.safetensors_stream import (TensorSource, file_sources, raw_bytes,
                                                streaming_checksum, write_streaming)
from fastprompt.data.folders import DatasetSplits
from fastprompt.data.sampling import add_label_noise


def noisy_variant(clean: FeatureCache, path, model: torch.nn.Module, model_name: str,
                  preprocess_train: Callable, preprocess_val: Callable, splits: DatasetSplits, *,
                  noise_rate: float, noise_type: str = "symmetric") -> FeatureCache:
    """The cache ``build_or_load_cache(path, ..., noise_rate=, noise_type=)`` would give, derived
    from ``clean`` (built from the same model, transforms, ``splits``, shots, seed and views
    with no label noise) instead of encoding the images again. An existing valid file at
    ``path`` is loaded as it is."""
    fp = clean.fingerprint
    if fp.get("noise_rate") != 0.0:
        raise ValueError(f"clean: {clean.path!r} holds noisy labels (rate {fp.get('noise_rate')}); "
                         "derive variants from a cache without label noise")
    def fingerprint(rate, kind):
        return cache_fingerprint(model, model_name, preprocess_train, preprocess_val, splits,
                                 views=fp["views"], shots=fp["shots"], noise_rate=rate,
                                 noise_type=kind, seed=fp["seed"])

    if fingerprint(0.0, fp["noise_type"]) != fp:
        raise ValueError(f"clean: {clean.path!r} was not built from these model, transforms, "
                         "splits and settings")
    expected = fingerprint(noise_rate, noise_type)
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        try:
            return load_cache(path, expected)
        except ValueError:
            pass  # stale or damaged: written again below
    m = clean.num_train_images
    noisy = add_label_noise(clean.train_clean_labels[:m].tolist(), clean.num_classes, noise_rate,
                            noise_type, seed=fp["seed"])
    labels = torch.tensor(noisy, dtype=torch.int64).repeat(fp["views"])
    with cache_lock(path):
        # Streamed from the clean file: no copy of the features in memory.
        sources = [s for s in file_sources(clean.path) if s.name != "train_labels"]
        sources.append(TensorSource("train_labels", torch.int64, tuple(labels.shape),
                                    lambda: [raw_bytes(labels)]))
        metadata = {"fastprompt.format": CACHE_FORMAT,
                    "fastprompt.fingerprint": json.dumps(expected, sort_keys=True),
                    "fastprompt.classnames": json.dumps(list(clean.classnames)),
                    "fastprompt.checksum": streaming_checksum(sources)}
        atomic_write(path, lambda f: write_streaming(f, sources, metadata))
    return load_cache(path, expected, verify=False)
