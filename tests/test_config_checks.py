"""The shared field checks of ``Config.validate`` (taskmoe.config): one rule, one message each."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from taskmoe.config import Config, check_choice, check_ints, check_min, check_range, doc
from taskmoe.errors import ConfigError


@dataclass
class _Cfg(Config):
    n: int = doc(2, "an integer >= 1")
    lr: float = doc(0.1, "> 0")
    p: float = doc(0.5, "in [0, 1)")
    mode: str = doc("a", "a or b")

    def validate(self) -> None:
        check_ints(self, ("n",))
        check_min(self, ("lr",), strict=True)
        check_range(self, ("p",), open_high=True)
        check_choice(self, "mode", ("a", "b"))


def test_defaults_pass_and_each_rule_names_the_field_and_value():
    _Cfg()
    cases = {
        "n": (0, r"_Cfg\.n must be an integer >= 1, got 0"),
        "lr": (0.0, r"_Cfg\.lr must be > 0, got 0\.0"),
        "p": (1.0, r"_Cfg\.p must be in \[0, 1\), got 1\.0"),
        "mode": ("c", r"_Cfg\.mode must be one of \('a', 'b'\), got 'c'"),
    }
    for field, (bad, msg) in cases.items():
        with pytest.raises(ConfigError, match=msg):
            _Cfg(**{field: bad})


def test_ints_refuse_bools_and_floats_and_bounds_are_inclusive_unless_open():
    for bad in (True, 2.0):
        with pytest.raises(ConfigError, match="must be an integer"):
            _Cfg(n=bad)
    _Cfg(p=0.0)  # closed low end
    cfg = _Cfg()
    check_min(cfg, ("lr",), 0.1)  # >= is inclusive
    with pytest.raises(ConfigError, match=r"lr must be > 0.1"):
        check_min(cfg, ("lr",), 0.1, strict=True)
    with pytest.raises(ConfigError, match=r"sec\.p must be in \(0\.5, 1\]"):
        check_range(cfg, ("p",), 0.5, 1, open_low=True, owner="sec")
