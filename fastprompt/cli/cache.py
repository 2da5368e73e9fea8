"""``fastprompt cache``: run the frozen image encoder once over a data set and cache its
features (under ``torchrun``, every rank encodes its share of the chunks; rank 0 merges)."""
from __future__ import annotations

from fastprompt.cli import common


def cmd_cache(args) -> None:
    model, pt, pv, _, _ = common.load_model(args)
    cache = common.build_cache(args, args.out, model, pt, pv)
    if not common.is_writer():
        return
    print(f"cache {cache.path}: {cache.num_classes} classes, {cache.num_train_images} training "
          f"images x {cache.views} views, {cache.test_features.shape[0]} test images, "
          f"feature dim {cache.feature_dim}")


COMMANDS = ("cache",)


def add_commands(sub) -> None:
    p = sub.add_parser("cache", help="run the frozen image encoder once and cache its features")
    common.add_model_args(p)
    common.add_data_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="cache file (.safetensors)")
    p.set_defaults(func=cmd_cache)
