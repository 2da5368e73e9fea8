"""argparse types that check a flag's value themselves, so that a bad value is refused naming
the flag (``argument --batch-size: expected an int >= 1, got '0'``) rather than the library
parameter it becomes (``batch_size``). Torch-free: ``fastprompt predict`` uses them."""
from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    """An argparse type: an int >= ``low``, refused by argparse naming the flag otherwise (the
    library's own errors would name its parameters, e.g. ``batch_size``)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value!r}")
        return number
    parse.__name__ = f"int >= {low}"
    return parse


def number_between(low: float, high: float):
    """An argparse type: a number in ``[low, high]`` (NaN refused), refused naming the flag."""
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"expected a number in [{low:g}, {high:g}], got "
                                             f"{value!r}")
        return number
    parse.__name__ = f"number in [{low:g}, {high:g}]"
    return parse
