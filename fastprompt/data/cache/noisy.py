"""Label-noise variants of a feature cache without re-encoding: the image features of a training
set do not depend on its labels, so a sweep over noise rates encodes each (data, model, shots,
seed, views) once and derives one cache file per noise setting (rate or count per class, and
type) from it.

A derived file is exactly what ``build_or_load_cache`` would have written for those arguments:
the same tensors except ``train_labels`` (the spec's noisy labels, drawn by ``add_label_noise``
or ``add_label_noise_per_class`` with the same seed), and the fingerprint ``cache_fingerprint``
gives for them; so ``build_or_load_cache`` and the
command line reuse it as their own.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from fastprompt._io import atomic_write
from fastprompt.data.cache.build import cache_lock
from fastprompt.data.cache.load import FeatureCache, load_cache
from fastprompt.data.cache.spec import CACHE_FORMAT, CacheSpec, as_spec
from fastprompt.data.cache.stream import (TensorSource, file_sources, raw_bytes,
                                          streaming_checksum, write_streaming)


def noisy_variant(clean: FeatureCache, path, spec: CacheSpec | torch.nn.Module | None = None,
                  *args, **spec_args) -> FeatureCache:
    """The cache ``build_or_load_cache(path, spec)`` would give, derived from ``clean`` (built
    from ``spec`` with no label noise) instead of encoding the images again. An existing valid
    file at ``path`` is loaded as it is.

    As in 0.1, ``noisy_variant(clean, path, model, model_name, preprocess_train,
    preprocess_val, splits, noise_rate=..., noise_type=...)`` works too (or with
    ``noise_per_class=...`` in place of ``noise_rate``): the views, shots and seed are then
    ``clean``'s.
    """
    if not isinstance(spec, CacheSpec):
        if "noise_rate" not in spec_args and "noise_per_class" not in spec_args:
            raise TypeError("noisy_variant() missing the keyword argument 'noise_rate' (or "
                            "'noise_per_class')")
        fp = clean.fingerprint
        spec_args = {"views": fp["views"], "shots": fp["shots"], "seed": fp["seed"],
                     **spec_args}
    spec = as_spec(spec, args, spec_args)
    fp = clean.fingerprint
    if fp.get("noise_rate") != 0.0 or fp.get("noise_per_class"):
        noise = (f"{fp['noise_per_class']} per class" if fp.get("noise_per_class")
                 else f"rate {fp.get('noise_rate')}")
        raise ValueError(f"clean: {clean.path!r} holds noisy labels ({noise}); derive variants "
                         "from a cache without label noise")
    clean_spec = dataclasses.replace(spec, noise_rate=0.0, noise_per_class=None,
                                     noise_type=fp["noise_type"])
    if clean_spec.fingerprint() != fp:
        raise ValueError(f"clean: {clean.path!r} was not built from these model, transforms, "
                         "splits and settings")
    expected = spec.fingerprint()
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(path):
        try:
            return load_cache(path, expected)
        except ValueError:
            pass  # stale or damaged: written again below
    # The fingerprints matched: clean's training images are spec.train, in its order.
    labels = torch.tensor(spec.noisy_labels, dtype=torch.int64).repeat(spec.views)
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
