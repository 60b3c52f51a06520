"""Data files that ship with tforge: the calibration and evaluation text (see README.md here)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["WIKITEXT"]

#: WikiText-2 raw, test split (CC BY-SA 3.0). Calibrate on its first half, evaluate on its second.
WIKITEXT = Path(__file__).resolve().parent / "wikitext-2-raw-test.txt"
