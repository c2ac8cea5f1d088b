"""`--plot FILE.png`: the lane table as grouped bars (one bar per server, min–max whiskers over -r runs)
and, with --sweep, decode and acceptance against the block size. matplotlib's Agg backend, small PNG.
"""

from __future__ import annotations

from pathlib import Path

PANELS = (("prefill_tps", "prefill tok/s"), ("adjusted_tps", "decode tok/s (acceptance-adjusted)"),
          ("aggregate_tps", "aggregate decode tok/s (np requests)"), ("load_s", "load-to-listening (s)"))
COLORS = {"qatserve": "#1f77b4", "llama.cpp": "#ff7f0e"}


def _stat(cell: dict, metric: str) -> dict | None:
    return cell.get("summary", {}).get(metric)


def plot(data: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe when another backend was picked earlier
    import matplotlib.pyplot as plt

    servers = list(data["servers"])
    lanes = data["lanes"]
    sweep = data.get("sweep")
    rows = 3 if sweep else 2
    fig = plt.figure(figsize=(10, 3.2 * rows), dpi=90)
    grid = fig.add_gridspec(rows, 2)
    width = 0.8 / len(servers)
    for i, (metric, title) in enumerate(PANELS):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        for j, server in enumerate(servers):
            xs, ys, lo, hi = [], [], [], []
            for k, lane in enumerate(lanes):
                st = _stat(lane["results"][server], metric)
                if st is None:
                    continue
                xs.append(k + (j - (len(servers) - 1) / 2) * width)
                ys.append(st["median"])
                lo.append(st["median"] - st["min"])
                hi.append(st["max"] - st["median"])
            ax.bar(xs, ys, width, label=server, color=COLORS.get(server),
                   yerr=[lo, hi] if data["reps"] > 1 and xs else None, capsize=3)
        ax.set_xticks(range(len(lanes)), [ln["lane"] for ln in lanes], fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8)
    if sweep:
        ax = fig.add_subplot(grid[2, :])
        acc_ax = ax.twinx()
        ks = [r["draft_max"] for r in sweep["rows"]]
        for server in servers:
            for metric, style in (("adjusted_tps", "-o"), ("decode_tps", ":")):
                pts = [(k, _stat(r["results"][server], metric)) for k, r in zip(ks, sweep["rows"])]
                pts = [(k, s["median"]) for k, s in pts if s is not None]
                if pts:
                    label = f"{server} {'adjusted' if metric == 'adjusted_tps' else 'rows verified'} tok/s"
                    ax.plot(*zip(*pts), style, color=COLORS.get(server), label=label)
            pts = [(k, _stat(r["results"][server], "acceptance")) for k, r in zip(ks, sweep["rows"])]
            pts = [(k, 100 * s["median"]) for k, s in pts if s is not None]
            if pts:
                acc_ax.plot(*zip(*pts), "--s", color=COLORS.get(server), alpha=0.5, label=f"{server} acceptance %")
        ax.set_xlabel("draft-max (block size)")
        ax.set_ylabel("tok/s")
        acc_ax.set_ylabel("acceptance %")
        acc_ax.set_ylim(0, 100)
        ax.set_title(f"block-size sweep of {sweep['base']}", fontsize=10)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()
        extra = acc_ax.get_legend_handles_labels()
        ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower right")
    fig.suptitle(f"qatserve bench: {Path(data['model']).name}, prompt {data['n_prompt']}, "
                 f"{data['n_gen']} generated, {'-t ' + str(data['threads']) if data.get('threads') else ''}",
                 fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out
