"""Issue 8's GPU table: llama.cpp CUDA and qatserve on the same synthetic Q4_0 files, on one machine.

    python benchmarks/gpu/run_all.py [--stage build|bench|all] [--shapes gemma3-270m,gemma3-27b,...]
        [--llama-src SRC] [--work /tmp/qatbench] [--out DIR] [-r 3] [--tokenizer-from FILE.gguf]

1. build: llama.cpp with CUDA (sm_90) under WORK/llama.cpp from SRC: the llama-cpp-python 0.3.36 sdist
   (.tar.gz, its vendor/llama.cpp) or a tarball of llama.cpp itself (.tar.xz / .tar.gz with a top folder
   llama.cpp/); only llama-bench and llama-batched-bench (~5-6 minutes on 16 cores). Kept: a later run
   with the binaries present skips it.
2. bench, per shape: `qatserve synth SHAPE` (Q4_0) into WORK, then
   - llama-bench -p 1150 -n 128 -fa 1 -ngl 99, K/V f16 and q8_0 (pp1150, tg128, tg128 with q8_0 K/V);
   - llama-batched-bench -npp 128 -ntg 128 -npl 1,2 -fa on (2-slot aggregate = S_TG at 2);
   - benchmarks/gpu/engine_bench.py on the same file (qatserve's engine, same measurements);
   then the file is deleted (--keep-files keeps it; 4 shapes take ~50 GB).
3. prints the table for both, with qatserve / llama.cpp ratios and issue 8's targets, and writes
   OUT/h100-engine-DATE.csv and .log (OUT: benchmarks/gpu).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHAPES = ["gemma3-270m", "gemma4-26b-a4b", "gemma3-27b", "gemma4-31b"]
TARGETS = {  # issue 8: (decode tok/s, decode x llama.cpp, prefill x, 2-slot x)
    "gemma3-27b": "tg >= 170 (1.65x), pp >= 2.5x, 2-slot >= 1.65x",
    "gemma4-31b": "tg >= 170 (1.65x), pp >= 2.5x, 2-slot >= 1.65x",
    "gemma4-26b-a4b": "tg, pp >= 1.5x",
    "gemma3-270m": "tg >= 2000 (2x)",
}
LOG: list[str] = []


def say(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    say("$ " + " ".join(str(c) for c in cmd))
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


# -- llama.cpp -------------------------------------------------------------------------------------
def llama_source(src: Path, work: Path) -> Path:
    """Unpack SRC under WORK once; the llama.cpp source folder."""
    dest = work / "llama.cpp"
    if (dest / "CMakeLists.txt").exists():
        return dest
    tmp = work / "unpack"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(src) as t:
        t.extractall(tmp, filter="data")
    found = [p.parent for p in tmp.rglob("CMakeLists.txt") if (p.parent / "ggml").is_dir() and
             (p.parent / "tools" / "llama-bench").is_dir()]
    if not found:
        raise SystemExit(f"{src}: no llama.cpp source tree inside")
    shutil.move(str(min(found, key=lambda p: len(p.parts))), dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_llama(src: Path, work: Path, jobs: int) -> Path:
    tree = llama_source(src, work)
    bins = tree / "build" / "bin"
    if (bins / "llama-bench").exists() and (bins / "llama-batched-bench").exists():
        say(f"llama.cpp already built: {bins}")
        return bins
    t0 = time.time()
    cfg = run(["cmake", "-S", str(tree), "-B", str(tree / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
               "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", "-DGGML_CUDA_NCCL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"])
    if cfg.returncode:
        raise SystemExit("cmake configure failed:\n" + cfg.stdout[-3000:] + cfg.stderr[-3000:])
    b = run(["cmake", "--build", str(tree / "build"), "-j", str(jobs), "--target", "llama-bench", "llama-batched-bench"])
    if b.returncode:
        raise SystemExit("llama.cpp build failed:\n" + b.stdout[-4000:] + b.stderr[-4000:])
    say(f"llama.cpp built in {time.time() - t0:.0f} s")
    return bins


def llama_numbers(bins: Path, model: Path, reps: int) -> dict:
    out: dict = {}
    r = run([str(bins / "llama-bench"), "-m", str(model), "-p", "1150", "-n", "128", "-fa", "1", "-ngl", "99",
             "-ctk", "f16,q8_0", "-ctv", "f16,q8_0", "-r", str(reps), "-o", "json"])
    if r.returncode:
        say("llama-bench failed: " + r.stderr[-2000:])
        return out
    for row in json.loads(r.stdout):
        kv = row.get("type_k", "f16")
        if kv != row.get("type_v", "f16"):
            continue
        out["build"] = f"{row.get('build_commit', '?')} ({row.get('build_number', '?')})"
        out["size_gib"] = row.get("model_size", 0) / 2**30
        if row.get("n_prompt", 0) and not row.get("n_gen", 0):
            if kv == "f16":
                out["pp"] = row["avg_ts"]
        elif kv in ("f16", "q8_0"):
            out[f"tg_{kv}"] = row["avg_ts"]
    r = run([str(bins / "llama-batched-bench"), "-m", str(model), "-c", "4096", "-b", "2048", "-ub", "512",
             "-npp", "128", "-ntg", "128", "-npl", "1,2", "-ngl", "99", "-fa", "on", "--output-format", "jsonl"])
    if r.returncode:
        say("llama-batched-bench failed: " + r.stderr[-2000:])
        return out
    for line in (r.stdout + r.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            row = json.loads(line)
            out[f"tg_{row['pl']}slot"] = row["speed_tg"]
    return out


# -- qatserve --------------------------------------------------------------------------------------
def qatserve_numbers(model: Path, reps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run([sys.executable, str(HERE / "engine_bench.py"), str(model), "-r", str(reps), "--device", "cuda"],
            env=env, cwd=ROOT)
    for line in r.stderr.splitlines()[-20:]:
        say("  qatserve: " + line)
    if r.returncode:
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def synth(shape: str, work: Path, tokenizer_from: str | None) -> Path:
    path = work / f"{shape}-q4_0.gguf"
    if path.exists():
        return path
    cmd = [sys.executable, "-m", "qatserve", "synth", shape, str(path)]
    if tokenizer_from:
        cmd += ["--tokenizer-from", tokenizer_from]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = run(cmd, env=env, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"synth {shape} failed:\n{r.stderr[-3000:]}")
    say(r.stderr.strip().splitlines()[-1])
    return path


# -- the table -------------------------------------------------------------------------------------
COLUMNS = [("pp", "pp1150 tok/s"), ("tg_f16", "tg128 tok/s"), ("tg_q8_0", "tg128 q8_0 KV"), ("tg_2slot", "2-slot tg")]


def table(rows: list[dict]) -> str:
    def f(v):
        return "-" if v is None else f"{v:,.1f}"

    out = ["| shape | engine | " + " | ".join(c for _, c in COLUMNS) + " | q8_0 KV cost |",
           "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        for who in ("llama.cpp", "qatserve"):
            d = r[who]
            cost = (1 - d["tg_q8_0"] / d["tg_f16"]) * 100 if d.get("tg_q8_0") and d.get("tg_f16") else None
            out.append(f"| {r['shape']} | {who} | " + " | ".join(f(d.get(k)) for k, _ in COLUMNS)
                       + f" | {'-' if cost is None else f'{cost:.1f}%'} |")
        ratios = []
        for k, _ in COLUMNS:
            a, b = r["llama.cpp"].get(k), r["qatserve"].get(k)
            ratios.append(f"{b / a:.2f}x" if a and b else "-")
        out.append(f"| {r['shape']} | ratio | " + " | ".join(ratios) + " | |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["build", "bench", "all"], default="all")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--llama-src", type=Path, default=Path("/tmp/llamacpp/llama_cpp_python-0.3.36.tar.gz"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/qatbench"))
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 8)
    ap.add_argument("--tokenizer-from", default=None, help="GGUF whose tokenizer the synthetic files copy")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--skip-qatserve", action="store_true")
    ap.add_argument("--keep-files", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bins = None
    if not args.skip_llama and args.stage in ("build", "all"):
        bins = build_llama(args.llama_src, args.work, args.jobs)
    if args.stage == "build":
        return 0
    if not args.skip_llama and bins is None:
        bins = args.work / "llama.cpp" / "build" / "bin"
        while not (bins / "llama-batched-bench").exists():  # a build started beside this run
            if not (args.work / "llama.cpp").exists():
                raise SystemExit(f"no llama.cpp build under {args.work}: run --stage build first")
            time.sleep(5)
    rows = []
    day = dt.date.today().isoformat()
    saved = args.work / "results"  # per shape and engine, so runs split over several calls share one table
    saved.mkdir(exist_ok=True)
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        path = synth(shape, args.work, args.tokenizer_from)
        row = {"shape": shape}
        for who, skip, fn in (("qatserve", args.skip_qatserve, lambda: qatserve_numbers(path, args.reps)),
                              ("llama.cpp", args.skip_llama, lambda: llama_numbers(bins, path, args.reps))):
            f = saved / f"{shape}.{who}.json"
            if not skip:
                f.write_text(json.dumps(fn()))
            row[who] = json.loads(f.read_text()) if f.exists() else {}
            say(f"{shape} {who}: {json.dumps(row[who])}")
        rows.append(row)
        if not args.keep_files:
            path.unlink()
        say("\n" + table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"h100-engine-{day}"
    with open(f"{stem}.csv", "a", newline="") as fh:
        w = csv.writer(fh)
        if fh.tell() == 0:
            w.writerow(["date", "shape", "engine", "pp1150", "tg128", "tg128_q8_0", "tg_2slot", "detail"])
        for r in rows:
            for who in ("llama.cpp", "qatserve"):
                d = r[who]
                w.writerow([day, r["shape"], who] + [f"{d[k]:.2f}" if d.get(k) else "" for k, _ in COLUMNS]
                           + [json.dumps({k: v for k, v in d.items() if k not in dict(COLUMNS)})])
    with open(f"{stem}.log", "a") as fh:
        fh.write("\n".join(LOG) + "\n\n" + table(rows) + "\n\nissue 8 targets: "
                 + "; ".join(f"{k}: {v}" for k, v in TARGETS.items()) + "\n")
    print("\n" + table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
