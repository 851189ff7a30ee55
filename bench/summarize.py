"""Print a pytest-benchmark JSON file as a table: median time, GB/s, fraction of copy bandwidth, speed-ups.

python -m bench.summarize bench.json
"""

from __future__ import annotations

import json
import sys

COLUMNS = (
    "ms",
    "GBps",
    "copy_GBps_same_bytes",
    "fraction_of_copy",
    "speedup_vs_reference",
    "speedup_vs_torch",
    "x_floor",
    "floor_ms",
)


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    machine = data.get("machine_info", {})
    sys.stdout.write(f"# {path}: {machine.get('cpu', {}).get('brand_raw', '')} {data.get('datetime', '')}\n")
    present = [c for c in COLUMNS if any(c in b.get("extra_info", {}) for b in data["benchmarks"])]
    sys.stdout.write("| benchmark | device | " + " | ".join(present) + " |\n")
    sys.stdout.write("|---|---|" + "---|" * len(present) + "\n")
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        cells = [str(info.get(c, "")) for c in present]
        sys.stdout.write(
            f"| {bench['fullname'].split('::')[-1]} | {info.get('device', '')} | " + " | ".join(cells) + " |\n"
        )


if __name__ == "__main__":
    main(sys.argv[1])
