"""Budget knobs, property-based over every registered method: any valid setting runs, any invalid one is refused.

Each method describes its knobs with ``budget_space()`` (dyntok/methods/budget.py); hypothesis draws settings
from that description, so a new method is covered as soon as it is registered (and fully once it describes
its knobs' ranges instead of relying on the default, which only knows its sweep).
"""
from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dyntok
from dyntok.methods.budget import Choice, Interval

from .conftest import TINY, tiny_model

METHODS = dyntok.list_methods()
FEW = settings(max_examples=15, deadline=None, derandomize=True)


@functools.cache
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(4, 3, TINY["img_size"], TINY["img_size"], generator=generator)


@functools.cache
def eval_model(method: str):
    return tiny_model(method).eval()


def valid_values(knob) -> st.SearchStrategy:
    if isinstance(knob, Choice):
        return st.sampled_from(knob.values)
    if knob.integer:
        low, high = knob.extremes() if knob.length is None else [end[0] for end in knob.extremes()]
        one = st.integers(low, high)
    else:
        one = st.floats(knob.low, knob.high, exclude_min=knob.low_open, exclude_max=knob.high_open,
                        allow_nan=False, allow_infinity=False)
    if knob.sentinels:
        one = one | st.sampled_from(knob.sentinels)
    return one if knob.length is None else st.lists(one, min_size=knob.length, max_size=knob.length)


def accepts(knob: Interval, number: float) -> bool:
    """What the knob's range says, written independently of ``Interval.check``."""
    if number in knob.sentinels:
        return True
    if not math.isfinite(number):
        return False
    above_low = number > knob.low if knob.low_open else number >= knob.low
    below_high = number < knob.high if knob.high_open else number <= knob.high
    return above_low and below_high and (not knob.integer or number == int(number))


def invalid_values(knob: Interval) -> st.SearchStrategy:
    numbers = st.floats(allow_nan=True, allow_infinity=True).filter(lambda number: not accepts(knob, number))
    wrong_type = st.sampled_from([True, None, "0.5", {"value": 0.5}])
    if knob.length is None:
        return numbers | wrong_type
    good = valid_values(Interval(knob.low, knob.high, knob.low_open, knob.high_open, knob.integer))
    one_bad = st.tuples(st.lists(good, min_size=knob.length - 1, max_size=knob.length - 1), numbers,
                        st.integers(0, knob.length - 1)).map(lambda t: t[0][:t[2]] + [t[1]] + t[0][t[2]:])
    wrong_length = st.lists(good, max_size=knob.length + 2).filter(lambda values: len(values) != knob.length)
    return one_bad | wrong_length | wrong_type


def budgets(method: str) -> st.SearchStrategy:
    space = eval_model(method).budget_space()
    return st.fixed_dictionaries({name: valid_values(knob) for name, knob in space.items()})


@functools.cache
def cheapest_macs(method: str) -> float:
    """The smallest per-image MACs over the ends of every knob's range (cost is monotone in each knob)."""
    model = eval_model(method)
    saved, space = model.get_budget(), model.budget_space()
    lowest = math.inf
    for ends in itertools.product(*(knob.extremes() for knob in space.values())):
        model.set_budget(**dict(zip(space, ends)))
        lowest = min(lowest, model.predict(images()).macs.min().item())
    model.set_budget(**saved)
    return lowest


@pytest.mark.parametrize("method", METHODS)
def test_budget_space_describes_the_current_budget_and_the_sweep(method):
    model = tiny_model(method).eval()
    batch = images()
    model.calibrate([(batch, torch.zeros(len(batch), dtype=torch.long))])  # fitted sweeps need data first
    space = model.budget_space()
    assert set(space) == set(model.get_budget())
    for point in [model.get_budget(), *model.budget_sweep()]:
        assert model.checked_budget(point).keys() == point.keys()


@pytest.mark.parametrize("method", METHODS)
@FEW
@given(data=st.data())
def test_any_valid_budget_runs_with_finite_logits_and_macs_in_range(method, data):
    model = eval_model(method)
    budget = data.draw(budgets(method), label="budget")
    model.set_budget(**budget)
    for name, value in budget.items():
        assert model.get_budget()[name] == pytest.approx(value)
    prediction = model.predict(images())
    assert torch.isfinite(prediction.logits).all()
    assert prediction.logits.shape == (len(images()), TINY["num_classes"])
    assert (prediction.macs >= cheapest_macs(method) * (1 - 1e-9)).all()
    assert (prediction.macs <= model.dense_macs() * (1 + 1e-9)).all()


INTERVAL_KNOBS = [(method, name) for method in METHODS
                  for name, knob in eval_model(method).budget_space().items() if isinstance(knob, Interval)]


@pytest.mark.parametrize("method, name", INTERVAL_KNOBS)
@FEW
@given(data=st.data())
def test_invalid_knob_values_are_refused_with_the_name_and_the_range(method, name, data):
    model = eval_model(method)
    knob = model.budget_space()[name]
    before = model.get_budget()
    value = data.draw(invalid_values(knob), label=name)
    with pytest.raises(ValueError) as info:
        model.set_budget(**{name: value})
    assert name in str(info.value) and knob.describe() in str(info.value)
    assert model.get_budget() == before


@pytest.mark.parametrize("method", METHODS)
def test_unknown_knob_names_list_the_real_ones(method):
    model = eval_model(method)
    with pytest.raises(ValueError) as info:
        model.set_budget(keep_ratoi=0.5)
    assert all(name in str(info.value) for name in model.budget_space())


def test_interval_describes_open_ends_lists_and_sentinels():
    assert Interval(0.0, 1.0, low_open=True).describe() == "a number in (0, 1]"
    assert Interval(0.0, 1.0, length=2, sentinels=(2.0,)).describe() == "a list of 2 numbers, each number in [0, 1] or 2"
    assert Interval(0.0, 1.0, high_open=True).describe() == "a number in [0, 1)"
    assert Interval(0.0, low_open=True).describe() == "a number > 0"
    assert Interval(0, 16, integer=True).check("r", 3.0) == 3
    with pytest.raises(ValueError, match=r"r must be a whole number in \[0, 16\]; got 2.5"):
        Interval(0, 16, integer=True).check("r", 2.5)
    assert Choice((0.5, [1, 2])).check("k", [1, 2]) == [1, 2]
    with pytest.raises(ValueError, match=r"k must be one of \[0.5, \[1, 2\]\]"):
        Choice((0.5, [1, 2])).check("k", True)


@pytest.mark.parametrize("target", [{"gmacs": math.nan}, {"gmacs": -1.0}, {"q": math.inf}, {"q": 0}], ids=str)
def test_dvt_calibration_targets_must_be_positive_numbers(target):
    model = eval_model("dvt")
    with pytest.raises(ValueError, match=f"{next(iter(target))} must be a number > 0"):
        model.calibrate([(images(), None)], **target)
