"""Budget knobs as plain data: what ``AdaptiveViT.budget_space()`` returns, and how a setting is written.

A method describes each knob once (a range, a list of ranges, or a set of choices) in the vocabulary of
:mod:`dyntok.ranges`. The description checks values with one consistent error naming the knob and its allowed
values, lets tests draw any valid setting (``tests/test_budget_properties.py``), and gives the ends of the
range where the cheapest and the most expensive settings lie.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..ranges import Choice, Interval, Range

__all__ = ["Interval", "Choice", "KnobSpace", "format_knobs"]

#: What ``budget_space()`` describes each knob with.
KnobSpace = Range


def format_knobs(knobs: Mapping[str, Any]) -> str:
    """``{'keep_ratio': 0.7}`` -> ``keep_ratio=0.7``; floats shortened, lists bracketed."""
    def short(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        if isinstance(value, (list, tuple)):
            return "[" + ",".join(short(item) for item in value) + "]"
        return str(value)
    return " ".join(f"{key}={short(value)}" for key, value in knobs.items()) or "default"
