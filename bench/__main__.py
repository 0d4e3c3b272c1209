"""`python -m bench [NAME ...] [--quick] [--out DIR]`: run benchmarks, print, write JSON and PNG.

Without names every benchmark runs, one after the other (never two at once: they share
two cores and would measure each other). A benchmark that fails is reported and the rest
still run; the exit status says whether all succeeded. `--replot` redraws the PNGs from
the JSON already in the output directory without measuring anything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from bench import BENCHMARKS
from bench.harness import (
    Goal,
    Progress,
    Result,
    clean_up_on_sigterm,
    render,
    stamp,
    write_json,
)

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def module(name: str) -> ModuleType:
    return importlib.import_module(BENCHMARKS[name])


def run_one(name: str, *, quick: bool, out: Path) -> Result:
    """Run one benchmark; print its table; write out/NAME.json and out/NAME.png."""
    mod = module(name)
    progress = Progress(name)
    progress("start", "quick sizes" if quick else "full sizes")
    result: Result = stamp(mod.run(quick=quick, progress=progress))
    print(render(result), flush=True)
    write_json(result, out / f"{name}.json")
    mod.plot(result, out / f"{name}.png")
    progress("done", f"wrote {out / name}.json and .png")
    return result


def load_result(path: Path) -> Result:
    data = json.loads(path.read_text())
    data["goals"] = [Goal(**g) for g in data.get("goals", [])]
    return Result(**data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test's run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    parser.add_argument("--replot", action="store_true", help="redraw PNGs from existing JSON")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)

    failed = []
    for name in names:
        try:
            if args.replot:
                module(name).plot(load_result(args.out / f"{name}.json"), args.out / f"{name}.png")
            else:
                run_one(name, quick=args.quick, out=args.out)
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            print(f"!! {name} failed", file=sys.stderr, flush=True)
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    clean_up_on_sigterm()
    sys.exit(main())
