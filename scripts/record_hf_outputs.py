"""Record Hugging Face pipeline outputs on the fixture models, the oracle of the task tests.

    python scripts/record_hf_outputs.py [--task text_classification ...]

needs torch (install exactly `torch==2.13.0`, the CPU wheel) and `transformers<5`. Each module
`scripts/hf_reference/<task>.py` exposes `record(models_dir) -> dict`; its result is written to
`tests/fixtures/hf_outputs/<task>.json` with the transformers / torch / tokenizers versions. The test
suite only reads those files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import hf_reference  # noqa: E402
from hf_reference.common import versions  # noqa: E402

SKIP = {"common"}
_NUMBER_LIST = re.compile(r"\[(?:\s*-?[0-9][0-9.eE+-]*,?)+\s*\]")


def dumps(data: dict) -> str:
    """Indented JSON with lists of numbers kept on one line (vectors stay readable and small)."""
    text = json.dumps(data, indent=1, ensure_ascii=False)
    return _NUMBER_LIST.sub(lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)


def available_tasks() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(hf_reference.__path__) if m.name not in SKIP)


def main(argv: list[str] | None = None) -> int:
    tasks = available_tasks()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", choices=tasks, help="record only this task (repeatable); default: all")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "tests" / "fixtures" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "hf_outputs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.task or tasks:
        start = time.perf_counter()
        module = importlib.import_module(f"hf_reference.{task}")
        result = module.record(args.models_dir)
        data = {
            "generator": {"script": "scripts/record_hf_outputs.py", "module": f"scripts/hf_reference/{task}.py", **versions()},
            **result,
        }
        path = args.out / f"{task}.json"
        path.write_text(dumps(data) + "\n", encoding="utf-8")
        print(f"{task}: wrote {path.relative_to(ROOT)} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
