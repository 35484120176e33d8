"""The serve bench's outputs besides JSON: the side-by-side Markdown table and the plot."""

from __future__ import annotations


def markdown_table(result: dict) -> str:
    """The side-by-side table (closed and open loop), grouped by load, as Markdown."""
    peer = result.get("peer")
    head = ["mode", "load", "server", "tok/s", f"x {peer}" if peer else "x none", "TTFT p50 ms", "TPOT p50 ms",
            "ITL p50 ms", "ITL p99 ms", "chunks/token", "rounds", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["results"]:
        if row["mode"] == "compare":
            continue
        server = row["system"] if row["preset"] == "-" else f"{row['system']} `{row['preset']}`"
        ratio = row.get("vs_peer") if peer else row.get("speedup_vs_none")
        chunks = round(row["chunks"] / row["output_tokens"], 2) if row["output_tokens"] else ""
        cells = [row["mode"], row["load"], server, row["output_tokens_per_s"], "" if ratio is None else f"{ratio}x",
                 row["ttft_ms_p50"], row["tpot_ms_p50"], row["itl_ms_p50"], row["itl_ms_p99"], chunks,
                 row.get("runs", 1), row["errors"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Closed-loop output tokens/s vs concurrency, one line per server/preset; open-loop TTFT beside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["results"] if r["mode"] != "compare"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = list(dict.fromkeys((r["system"], r["preset"]) for r in rows if r["mode"] == "closed"))
    label = {s: s[0] if s[1] == "-" else f"{s[0]} {s[1]}" for s in series}
    for s in series:
        pts = sorted((r["concurrency"], r["output_tokens_per_s"]) for r in rows
                     if r["mode"] == "closed" and (r["system"], r["preset"]) == s)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label[s])
    for r in result["results"]:
        if r["mode"] == "compare" and r["system"].startswith("transformers"):
            ax.axhline(r["output_tokens_per_s"], ls="--", lw=1, color="grey" if "seq" in r["system"] else "black",
                       label=f"{r['system']} (batch {r['concurrency']})")
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput over HTTP (streaming chat completions)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    opens = [r for r in rows if r["mode"] == "open"]
    loads = list(dict.fromkeys(r["load"] for r in opens))
    width = 0.8 / max(len(series), 1)
    for k, s in enumerate(series):
        vals = [next((r["ttft_ms_p50"] for r in opens if r["load"] == ld and (r["system"], r["preset"]) == s), 0)
                for ld in loads]
        ax2.bar([i + k * width for i in range(len(loads))], vals, width, label=label[s])
    ax2.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(loads))], [f"λ={ld}" for ld in loads])
    ax2.set_ylabel("TTFT p50 (ms)")
    ax2.set_title("Open loop (Poisson arrivals)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"lightvlm bench serve — {result['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
