"""Data: image folders and CoOp split files, few-shot subsets, label noise, the feature cache,
ATLaS soft labels, and a synthetic shapes data set.

Typical use::

    splits = load_dataset(root)                               # folders or split_zhou_*.json
    cache = build_or_load_cache("cache.safetensors", model, "ViT-B-32", preprocess_train,
                                preprocess_val, splits, views=8, shots=16, seed=1)
    text = fastprompt.models.zeroshot_text_features(model, tokenizer, cache.classnames)
    csl = class_soft_labels(text)                                         # C x C
    isl = instance_soft_labels(cache.train_features, cache.train_sample_index, text,
                               num_samples=cache.num_train_images)       # M x C
"""
from fastprompt.data.cache import (CACHE_FORMAT, DEFAULT_VIEWS, CacheChunk, CachePlan,
                                   FeatureCache, build_feature_cache, build_or_load_cache,
                                   cache_fingerprint, encode_cache_chunks, load_cache,
                                   merge_cache_chunks, plan_feature_cache)
from fastprompt.data.folders import (DEFAULT_TEST_FRACTION, IMAGE_EXTENSIONS, DatasetSplits,
                                     load_coop_split, load_dataset, load_image_folder)
from fastprompt.data.sampling import (NOISE_TYPES, add_label_noise, add_label_noise_per_class,
                                      few_shot_subset)
from fastprompt.data.soft_labels import (DEFAULT_CSL_TEMPERATURE, DEFAULT_ISL_SCALE,
                                         class_soft_labels, instance_soft_labels)
from fastprompt.data.synthetic import make_shapes_dataset

__all__ = [
    "CACHE_FORMAT", "DEFAULT_CSL_TEMPERATURE", "DEFAULT_ISL_SCALE",
    "DEFAULT_TEST_FRACTION", "DEFAULT_VIEWS", "IMAGE_EXTENSIONS", "NOISE_TYPES", "CacheChunk",
    "CachePlan", "DatasetSplits", "FeatureCache", "add_label_noise", "add_label_noise_per_class",
    "build_feature_cache", "build_or_load_cache", "cache_fingerprint", "class_soft_labels",
    "encode_cache_chunks", "few_shot_subset", "instance_soft_labels", "load_cache", "load_coop_split", "load_dataset",
    "load_image_folder", "make_shapes_dataset", "merge_cache_chunks", "plan_feature_cache",
]
