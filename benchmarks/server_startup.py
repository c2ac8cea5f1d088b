"""Load-to-listening of `qatserve serve`, as a user measures it: from starting the process until
/health answers 200 (model loaded, kernels built: the first request runs at full speed).

    python benchmarks/server_startup.py [-r 5] [-- extra serve flags]

Prints each run's wall time measured here (spawn -> first 200, polled every 20 ms), the server's own
figure (from its process start, in its "listening" line) with the CPU seconds it spent and its phases,
then the medians and the machine's load average (on a shared machine the wall time grows with the load;
the kernels build on a second thread beside the serial part, so an idle 2-core machine's wall time is
close to the CPU seconds of the server's main thread, which its "listening" line also reports).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qatserve.bench.servers import ServerProcess, free_port, qatserve_argv  # noqa: E402


def one_run(extra: list[str]) -> tuple[float, str]:
    """(seconds from spawn to /health 200, the server's "listening on" line); the same timing as
    `qatserve bench`'s load-to-listening column."""
    port = free_port()
    with ServerProcess(qatserve_argv(None, port, extra), port, name="qatserve serve") as proc:
        wall = proc.start()
        proc.stop()
        line = next((ln for ln in proc.log().splitlines() if "listening on" in ln), "")
    return wall, line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-r", "--runs", type=int, default=5)
    ap.add_argument("extra", nargs="*", help="flags passed to qatserve serve (after --)")
    args = ap.parse_args()
    walls, cpus = [], []
    for i in range(args.runs):
        wall, line = one_run(args.extra)
        walls.append(wall)
        own = re.search(r"load-to-listening ([\d.]+) s from process start, ([\d.]+) s of CPU", line)
        if own:
            cpus.append(float(own.group(2)))
        print(f"run {i + 1}: {wall:.2f} s to /health 200 (server's own figure: {own.group(1) if own else '?'} s, "
              f"CPU {own.group(2) if own else '?'} s)")
        print(f"    {line.removeprefix('qatserve: ')}")
    print(f"median {statistics.median(walls):.2f} s, min {min(walls):.2f} s over {len(walls)} runs; "
          f"CPU median {statistics.median(cpus) if cpus else float('nan'):.2f} s; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
