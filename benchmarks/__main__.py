"""``python -m benchmarks [--quick] [--scale] [--sections a,b] [--out-dir DIR]``: run the
suite from a source checkout (``--scale``: the scaling section only, ``--sections``: a
subset; both set ``QARM_BENCH_SECTIONS``).

The suite is not part of the installed package (it imports the library, the library never
imports it); ``make bench`` and CI run it this way.
"""

from __future__ import annotations

import argparse
import logging
import os

from benchmarks.suite import run_suite


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="~2 minute mode (CI)")
    parser.add_argument("--out-dir", default="benchmarks/results", help="results directory")
    parser.add_argument("--scale", action="store_true", help="the scaling section only")
    parser.add_argument("--sections", help="comma-separated subset of the suite's sections")
    args = parser.parse_args()
    if args.scale or args.sections:
        os.environ["QARM_BENCH_SECTIONS"] = args.sections or "scale"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(run_suite(out_dir=args.out_dir, quick=args.quick))


if __name__ == "__main__":
    main()
