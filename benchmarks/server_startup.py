"""Load-to-listening of `qatserve serve`, as a user measures it: from starting the process until
/health answers 200 (model loaded, kernels built: the first request runs at full speed).

    python benchmarks/server_startup.py [-r 5] [-- extra serve flags]

Prints each run's wall time measured here (Popen -> first 200, polled every 10 ms), the server's own
figure (from its process start, in its "listening" line) with the CPU seconds it spent and its phases,
then the medians and the machine's load average (on a shared machine the wall time grows with the load;
start-up is nearly serial, so the CPU seconds are close to what an idle machine's wall time would be).
"""

from __future__ import annotations

import argparse
import os
import http.client
import re
import socket
import statistics
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def one_run(extra: list[str]) -> tuple[float, str]:
    port = free_port()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "qatserve", "serve", "--port", str(port), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not healthy(port):
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {proc.stderr.read()}")
            time.sleep(0.01)
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    line = next((ln for ln in err.splitlines() if "listening on" in ln), "")
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
