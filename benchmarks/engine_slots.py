"""Single-slot decode tok/s beside two-slot aggregate decode tok/s (issue 4), optionally with llama.cpp.

    python benchmarks/engine_slots.py -t 2 [-n 128] [-ctk f16] [--llama-server /tmp/llamacpp/bin/llama-server]

Decode rate = generated tokens / time from the first to the last generated token. Aggregate: both slots
start together (same prompt length), tokens of both / wall time of the joint decode phase. The peer
runs `llama-server -np 2` on the same GGUF and the same prompts (greedy, /completion timings).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["The history of the printing press begins", "A recipe for a simple tomato soup:"]


def ours(args) -> tuple[float, float]:
    from qatserve.engine.engine import Engine, EngineConfig
    from qatserve.engine.kv_cache import KVCacheOptions
    from qatserve.engine.llm import LLM
    from qatserve.engine.sampler import SamplingParams

    llm = LLM(args.model, n_ctx=4096, n_slots=2, cache_type_k=args.ctk, cache_type_v=args.ctv,
              n_threads=args.threads).prepare()
    params = SamplingParams(temperature=0.0, max_tokens=args.n, seed=1)
    llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    single = []
    for _ in range(args.reps):
        eng = Engine(llm.model, llm.tokenizer, EngineConfig(n_ctx=4096, kv=KVCacheOptions(args.ctk, args.ctv)))
        r = eng.add_request(llm.tokenize(PROMPTS[0]), params)
        eng.run_until_done()
        single.append(r.result.timings.predicted_per_second)
    agg = []
    for _ in range(args.reps):
        eng = Engine(llm.model, llm.tokenizer, EngineConfig(n_ctx=8192, n_slots=2, kv=KVCacheOptions(args.ctk, args.ctv)))
        reqs = [eng.add_request(llm.tokenize(p), params) for p in PROMPTS]
        while any(r.t_first_token is None for r in reqs):
            eng.step()
        t0 = time.perf_counter()
        n0 = sum(len(r.generated) for r in reqs)
        eng.run_until_done()
        agg.append((sum(len(r.result.tokens) for r in reqs) - n0) / (time.perf_counter() - t0))
    return sorted(single)[len(single) // 2], sorted(agg)[len(agg) // 2]


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def peer(args) -> tuple[float, float]:
    from qatserve.bench.servers import ServerProcess, free_port, llama_server_argv

    port = free_port()
    argv = llama_server_argv(args.llama_server, args.model, port, ["-np", "2", "-c", "8192", "-t", str(args.threads),
                                                                   "-ctk", args.ctk, "-ctv", args.ctv])
    with ServerProcess(argv, port, name="llama-server") as proc:
        proc.start()
        body = {"n_predict": args.n, "temperature": 0, "cache_prompt": False, "ignore_eos": True}
        _post(port, {**body, "prompt": PROMPTS[0], "n_predict": 8})
        single = sorted(_post(port, {**body, "prompt": PROMPTS[0]})["timings"]["predicted_per_second"]
                        for _ in range(args.reps))[args.reps // 2]
        aggs = []
        for _ in range(args.reps):
            out = [None, None]
            ths = [threading.Thread(target=lambda i=i: out.__setitem__(i, _post(port, {**body, "prompt": PROMPTS[i]})))
                   for i in range(2)]
            for t in ths:
                t.start()
            for t in ths:
                t.join()
            # Both decode together; each slot's rate is measured over its own decode phase.
            aggs.append(sum(o["timings"]["predicted_per_second"] for o in out))
        return single, sorted(aggs)[len(aggs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=128, help="tokens generated per request")
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-ctk", default="f16")
    ap.add_argument("-ctv", default="f16")
    ap.add_argument("--llama-server", default=None)
    args = ap.parse_args()
    if args.model is None:
        from qatserve.default_model import default_model_path

        args.model = default_model_path()
    rows = [("qatserve", *ours(args))]
    if args.llama_server:
        rows.append(("llama.cpp", *peer(args)))
    print(f"| engine | single-slot decode tok/s | two-slot aggregate tok/s | ratio |  (-t {args.threads}, "
          f"-n {args.n}, KV {args.ctk}/{args.ctv}, median of {args.reps})")
    print("|---|---|---|---|")
    for name, s, a in rows:
        print(f"| {name} | {s:.1f} | {a:.1f} | {a / s:.2f} |")


if __name__ == "__main__":
    main()
