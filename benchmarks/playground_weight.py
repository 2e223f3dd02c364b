"""The playground page's weight: the uncompressed (and gzip) size of every file it loads.

The page is one HTML file, two ES modules and one stylesheet, all shipped in the package and
served by vlmlab (no CDN, no build step). Goal (issue 19): <= 300 KB uncompressed in all.

    .venv/bin/python benchmarks/playground_weight.py [--json out.json]
"""

from __future__ import annotations

import argparse
import gzip
import json

from vlmlab.server.playground import ASSETS, asset_bytes

GOAL_BYTES = 300 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the sizes to this file")
    args = parser.parse_args()
    sizes = {name: len(asset_bytes(name)) for name in ASSETS}
    gzipped = {name: len(gzip.compress(asset_bytes(name), 9)) for name in ASSETS}
    for name in ASSETS:
        print(f"{name:<12} {sizes[name]:>8,} B  ({gzipped[name]:,} B gzip)")
    total = sum(sizes.values())
    verdict = "within" if total <= GOAL_BYTES else "OVER"
    print(f"{'total':<12} {total:>8,} B  ({sum(gzipped.values()):,} B gzip); {verdict} the goal of {GOAL_BYTES:,} B")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"bytes": sizes, "gzip_bytes": gzipped, "total": total, "goal": GOAL_BYTES}, out, indent=2)


if __name__ == "__main__":
    main()
