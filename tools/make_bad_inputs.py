"""Write the bad-input corpus (tests/bad_inputs/cases.py) into a folder, one sub-folder a case.

    .venv/bin/python tools/make_bad_inputs.py /tmp/bad   # then: tforge compile /tmp/bad/<case>/model.onnx ...

Prints ``name<TAB>path<TAB>expected message fragment`` per case. The tests generate the same
files into a temporary folder; nothing binary is committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.bad_inputs.cases import CASES, STRICT_CASES, write_all  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an empty or new folder")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if any(args.folder.iterdir()):
        parser.error(f"{args.folder} is not empty")
    paths = write_all(args.folder)
    expected = {**CASES, **STRICT_CASES}
    for name, path in paths.items():
        strict = " (with --strict)" if name in STRICT_CASES else ""
        print(f"{name}\t{path}\t{expected[name][1]}{strict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
