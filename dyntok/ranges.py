"""A value in a range, with a readable error: the one vocabulary every checked setting is declared in.

Budget knobs (``AdaptiveViT.budget_space()``), data and training options (``DataConfig``, ``TrainConfig``) and
the benchmark spec's fields each declare their valid values once, as an :class:`Interval` or a
:class:`Choice`; the same declaration checks a value with one consistent error naming the setting and what it
accepts, lets tests draw any valid value, and gives the ends of the range. This module imports nothing else
from dyntok: every layer may use it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["Interval", "Choice", "Range", "check_ranges"]


@dataclass(frozen=True)
class Interval:
    """A finite number in ``[low, high]`` (ends excluded when ``low_open``/``high_open``), or a list of
    ``length`` of them.

    ``integer`` values are whole numbers only. ``sentinels`` are extra values with a documented meaning
    outside the range (DVT's "never exit at this stage").
    """

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    length: int | None = None
    sentinels: tuple[float, ...] = ()

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        if self.high == math.inf:
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            bounds = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        extra = "".join(f" or {value:g}" for value in self.sentinels)
        if self.length is None:
            return f"{kind} {bounds}{extra}"
        return f"a list of {self.length} numbers, each {kind[2:]} {bounds}{extra}"

    def check(self, name: str, value: Any) -> Any:
        """``value`` as a float, int or list of them; a ``ValueError`` naming ``name`` when it is not valid."""
        if self.length is None:
            return self._one(name, value)
        if not isinstance(value, (list, tuple)) or len(value) != self.length:
            raise ValueError(f"{name} must be {self.describe()}; got {value!r}")
        return [self._one(name, item) for item in value]

    def _one(self, name: str, value: Any) -> float | int:
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if number is not None and number in self.sentinels:
            return float(number)
        low_ok = number is not None and (number > self.low if self.low_open else number >= self.low)
        high_ok = number is not None and (number < self.high if self.high_open else number <= self.high)
        valid = low_ok and high_ok and math.isfinite(number)
        if valid and self.integer and number != int(number):
            valid = False
        if not valid:
            raise ValueError(f"{name} must be {self.describe()}; got {value!r}")
        return int(number) if self.integer else float(number)

    def extremes(self) -> list[Any]:
        """The two ends of the range (the open end approached as closely as floats allow)."""
        low = math.nextafter(self.low, self.high) if self.low_open else self.low
        high = math.nextafter(self.high, self.low) if self.high_open else self.high
        if self.integer:
            low, high = math.ceil(low), math.floor(high)
        ends = [low, high]
        return ends if self.length is None else [[end] * self.length for end in ends]


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values (numbers, strings or lists: anything JSON can hold)."""

    values: tuple[Any, ...]

    def describe(self) -> str:
        return f"one of {list(self.values)}"

    def check(self, name: str, value: Any) -> Any:
        for allowed in self.values:
            if type(allowed) is type(value) and allowed == value:
                return value
            if isinstance(allowed, float) and isinstance(value, int) and not isinstance(value, bool) \
                    and allowed == value:
                return float(value)
        raise ValueError(f"{name} must be {self.describe()}; got {value!r}")

    def extremes(self) -> list[Any]:
        return list(self.values)


#: Either description.
Range = Interval | Choice


def check_ranges(values: Any, ranges: Mapping[str, Range], optional: frozenset[str] | set[str] = frozenset(),
                 name=lambda setting: setting) -> None:
    """``ValueError`` for the first attribute of ``values`` outside its range in ``ranges``.

    Settings in ``optional`` may also be None; ``name(setting)`` is how the error names one (``'lr (--lr)'``).
    """
    for setting, accepted in ranges.items():
        value = getattr(values, setting)
        if value is None and setting in optional:
            continue
        accepted.check(name(setting), value)
