"""The feature cache: the frozen image encoder runs once over a data set, and training reads the
features from one memory-mapped file.

Training images get ``views`` augmented views each (``preprocess_train``, plus a horizontal flip
when that transform has none, as CoOp trains), seeded per (image, view) so a rebuild is
bit-identical; test and validation images get one plain view (``preprocess_val``).

File format: one safetensors file (chosen over ``torch.save``: no pickle, the header — and with
it the fingerprint — is read without touching the data, and ``safe_open`` memory-maps the tensors,
so loading costs nothing until rows are used). Tensors, with ``M`` training images, ``K`` views,
``T`` test and ``V`` validation images, ``D`` the feature dimension:

=======================  ==============  =====================================================
``train_features``       (K*M, D) fp16   ``encode_image`` output, not normalised. Row
                                         ``v*M + m`` is view ``v`` of training image ``m``
                                         (view-major: one view of every image is a contiguous
                                         block).
``train_labels``         (K*M,) int64    the (possibly noisy) training label of the row's image
``train_clean_labels``   (K*M,) int64    its true label, for reporting
``train_sample_index``   (K*M,) int64    ``m``: the source image (indexes instance-wise soft
                                         labels, one row per image)
``train_view_index``     (K*M,) int64    ``v``
``test_features``        (T, D) fp16     one ``preprocess_val`` view per test image
``test_labels``          (T,) int64      clean labels
``val_features``         (V, D) fp16     as test (V may be 0)
``val_labels``           (V,) int64
``{train,test,val}_paths``  uint8        the image paths, ``os.fsencode``-d, NUL-separated
=======================  ==============  =====================================================

Metadata (strings): ``fastprompt.format`` (:data:`CACHE_FORMAT`), ``fastprompt.fingerprint``
(JSON, see :func:`cache_fingerprint`), ``fastprompt.classnames`` (JSON list) and
``fastprompt.checksum`` (BLAKE2b of every tensor's name, dtype, shape and bytes). Features are
stored as float16 (half the disk and page-cache footprint; CLIP features are O(1), far inside
float16's range, and a non-finite value fails the build).

Building: :func:`plan_feature_cache` fixes the images, views and seeds and splits them into
chunks of whole encoder batches; :func:`encode_cache_chunks` writes each chunk's features to
its own file in ``<path>.chunks/`` (format :data:`CHUNK_FORMAT`: one tensor ``features``,
(views, images, D) float16, with the fingerprint, the chunk's place and a checksum); and
:func:`merge_cache_chunks` streams them into the cache file, then removes them. Any number of
processes may encode chunks (``torchrun`` ranks, a Ray cluster); a chunk file is written once,
atomically, so a killed build resumes from the ones it left.

What a cache is built from is one :class:`CacheSpec` (model, model name, the two transforms,
the splits, views, shots, label noise (a rate or a count per class), seed, flip, encoder batch
and chunk size), checked when it is made; the fingerprint is computed from it. Every function
that builds takes a spec, or, as in 0.1, its arguments in its place::

    spec = CacheSpec(model, "ViT-B-32", preprocess_train, preprocess_val, splits, views=8,
                     shots=16, seed=1)
    cache = build_or_load_cache("cache.safetensors", spec)

The modules, each depending only on those above it:

* ``stream``: safetensors files written and read piece by piece (the merge and the noisy
  variants stream files larger than memory); knows nothing of caches.
* ``spec``: :class:`CacheSpec`, the fingerprint and what goes into it (the data hash, the
  transforms' hash), the seeds of the views, the checks of a build's other arguments.
* ``plan``: :class:`CachePlan` and :class:`CacheChunk` (the chunk layout), which rank encodes
  which chunks (:func:`torchrun_rank`), where a SoftCPT run's task caches go.
* ``load``: :class:`FeatureCache`, :func:`load_cache` and its layout checks, and the checks of a
  cache against the model it is used with.
* ``chunks``: chunk files: their metadata, writing, opening and checking, removal.
* ``encode``: the image views data set and the encoding of chunks.
* ``merge``: the chunk files streamed into the cache file.
* ``build``: the lock, the waits for chunk files and for the merged file, the ``torchrun``
  coordination, :func:`merge_cache_chunks`, :func:`build_feature_cache`,
  :func:`build_or_load_cache`.
* ``noisy``: label-noise variants of a cache, derived without encoding again.
"""
from fastprompt.data.cache.build import (CHUNK_WAIT_SECONDS, build_feature_cache,
                                         build_or_load_cache, cache_lock, merge_cache_chunks)
from fastprompt.data.cache.chunks import CHUNK_FORMAT
from fastprompt.data.cache.encode import encode_cache_chunks
from fastprompt.data.cache.load import (FeatureCache, check_cache_weights, load_cache,
                                        load_cache_for)
from fastprompt.data.cache.noisy import noisy_variant
from fastprompt.data.cache.plan import (CacheChunk, CachePlan, plan_feature_cache,
                                        task_cache_path, torchrun_rank)
from fastprompt.data.cache.spec import (CACHE_FORMAT, DEFAULT_BATCH_SIZE, DEFAULT_CHUNK_SIZE,
                                        DEFAULT_VIEWS, RECORD_ONLY_KEYS, CacheSpec,
                                        cache_fingerprint, same_fingerprint)

__all__ = [
    "CACHE_FORMAT", "CHUNK_FORMAT", "CHUNK_WAIT_SECONDS", "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHUNK_SIZE", "DEFAULT_VIEWS", "RECORD_ONLY_KEYS", "CacheChunk", "CachePlan", "CacheSpec",
    "FeatureCache", "build_feature_cache", "build_or_load_cache", "cache_fingerprint",
    "cache_lock", "check_cache_weights", "encode_cache_chunks", "load_cache", "load_cache_for",
    "merge_cache_chunks", "noisy_variant", "plan_feature_cache", "same_fingerprint",
    "task_cache_path", "torchrun_rank",
]
