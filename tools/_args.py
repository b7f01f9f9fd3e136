"""Argument types for the command lines of the tools: argparse calls them on the flag's
text and turns an ArgumentTypeError into a usage error naming the flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = [
    "at_least",
    "non_negative_float",
    "non_negative_int",
    "positive_float",
    "positive_int",
]


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer no smaller than `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer ≥ 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0, got {text}")
    return value
