"""dyntok says once, naming the versions, when torch or timm is outside the range it was tested with."""
from __future__ import annotations

import warnings

import pytest

from dyntok import _versions
from dyntok._versions import TESTED, DependencyVersionWarning, untested_versions, warn_if_untested


def test_installed_versions_are_the_tested_ones():
    """The environment the README's commands build is inside the range; otherwise every figure is suspect."""
    assert untested_versions() == []


@pytest.mark.parametrize("package", sorted(TESTED))
def test_a_version_outside_the_range_is_named(package):
    oldest, newest = TESTED[package]
    for found in ("0.1.0", "99.0.0"):
        problems = untested_versions({package: found})
        assert len(problems) == 1
        assert f"{package} {found}" in problems[0] and oldest in problems[0] and newest in problems[0]


def test_local_build_tags_and_both_ends_are_inside():
    oldest, newest = TESTED["torch"]
    assert untested_versions({"torch": f"{oldest}+cu130", "timm": TESTED["timm"][1]}) == []
    assert untested_versions({"torch": f"{newest}+cpu"}) == []


def test_the_warning_is_a_dependency_version_warning(monkeypatch):
    monkeypatch.setattr(_versions, "_installed_version", lambda package: "0.0.1")
    with pytest.warns(DependencyVersionWarning, match="torch 0.0.1 is installed"):
        warn_if_untested()


def test_no_warning_inside_the_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_untested()
