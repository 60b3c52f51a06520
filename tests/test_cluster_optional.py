"""Without Ray installed, asking for workers says how to install it (one line)."""

from __future__ import annotations

import sys

import pytest

from tforge.errors import PassConfigError
from tforge.runtime import cluster


def test_workers_without_ray_say_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(PassConfigError, match=r"pip install 'tforge\[ray\]'"), cluster.cluster(2):
        pass
