"""`python -m benchmarks.gpu.peers fetch` (here, before a GPU call) and `... build` (the call runs it on the device).

Usage:
    python -m benchmarks.gpu.peers fetch [--source ../shared/peers] [--no-wheels]
    python -m benchmarks.gpu.peers build --out DIR [--work /tmp/gpt2_jax_gpu] [--dry]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu.peers", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="copy the peers' sources (and the server's wheels) into .peers/")
    fetch.add_argument("--source", help="the peers' folder (default: ../shared/peers beside the checkout)")
    fetch.add_argument("--no-wheels", dest="wheels", action="store_false", help="no pip download")
    build = sub.add_parser("build", help="build llm.c (on the device)")
    build.add_argument("--out", required=True)
    build.add_argument("--work", default="/tmp/gpt2_jax_gpu")
    build.add_argument("--dry", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    if args.command == "fetch":
        from benchmarks.gpu.peers import carry

        carry.fetch(args.source or carry.SOURCE, wheels=args.wheels)
        return 0
    from benchmarks.gpu.peers import llmc_build

    done = llmc_build.build(args.out, args.work, dry=args.dry)
    return 0 if done["ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
