"""Turn ``samples.jsonl`` into ``summary.json``, ``results.md``, PNG plots and one self-contained HTML page."""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections import defaultdict
from pathlib import Path


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(records: list[dict]) -> dict:
    """Aggregate task records per (engine, method, budget, protocol, task, length); fidelity per run."""
    groups = defaultdict(list)
    for r in records:
        if r.get("kind") == "task":
            groups[(r["engine"], r["method"], str(r["budget"]), r["protocol"], r["task"], r["length"])].append(r)
    full_bytes = {}
    for (engine, method, _, _, task, length), rs in groups.items():
        if method == "full":
            full_bytes[(engine, task, length)] = _median(r.get("cache_bytes") for r in rs)
    rows = []
    for (engine, method, budget, protocol, task, length), rs in sorted(groups.items()):
        scored = [r["score"] for r in rs if r.get("score") is not None]
        cache = _median(r.get("cache_bytes") for r in rs)
        full = full_bytes.get((engine, task, length)) or full_bytes.get(("infercache", task, length))
        rows.append({
            "engine": engine, "method": method, "budget": budget, "protocol": protocol, "task": task,
            "length": length, "n": len(rs), "errors": sum(1 for r in rs if r.get("error")),
            "score": sum(scored) / len(scored) if scored else None,
            "cache_mib": cache / 2**20 if cache else None,
            "bytes_vs_full": cache / full if cache and full else None,
            "prefill_s": _median(r.get("prefill_s") for r in rs),
            "scoring_s": _median(r.get("scoring_s") for r in rs),
            "decode_tok_s": _median(r.get("decode_tok_s") for r in rs),
        })
    fidelity = [
        {k: r.get(k) for k in ("engine", "method", "budget", "length", "kl", "top1", "greedy_match", "first_divergence")}
        for r in records if r.get("kind") == "fidelity"
    ]
    return {"rows": rows, "fidelity": fidelity}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"infercache bench: {meta.get('model')} on {meta.get('machine')} ({meta.get('cpu_count')} CPUs, "
             f"{meta.get('torch_threads')} torch thread(s)), {meta.get('date')}", "",
             "| engine | method | budget | protocol | task | length | n | score | KV MiB | vs full | prefill s | scoring s | decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        err = f" ({r['errors']} errors)" if r["errors"] else ""
        lines.append(
            f"| {r['engine']} | {r['method']} | {r['budget']} | {r['protocol']} | {r['task']} | {r['length']} | "
            f"{r['n']}{err} | {_fmt(r['score'], '.2f')} | {_fmt(r['cache_mib'], '.2f')} | "
            f"{_fmt(r['bytes_vs_full'], '.1%')} | {_fmt(r['prefill_s'], '.2f')} | {_fmt(r['scoring_s'], '.3f')} | "
            f"{_fmt(r['decode_tok_s'], '.1f')} |"
        )
    if summary["fidelity"]:
        lines += ["", "Fidelity against the full cache (natural-text continuation, context compressed alone):", "",
                  "| method | budget | length | KL (nats) | top-1 agreement | greedy match (32 tokens) |",
                  "|---|---|---|---|---|---|"]
        for f in summary["fidelity"]:
            lines.append(f"| {f['method']} | {f['budget']} | {f['length']} | {_fmt(f['kl'], '.4f')} | "
                         f"{_fmt(f['top1'], '.1%')} | {_fmt(f['greedy_match'], '.1%')} |")
    return "\n".join(lines) + "\n"


def plot_score_vs_budget(summary: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(lambda: defaultdict(list))
    full = defaultdict(list)
    for r in summary["rows"]:
        if r["score"] is None:
            continue
        if r["method"] == "full":
            full[r["engine"]].append(r["score"])
            continue
        try:
            budget = float(r["budget"])
        except ValueError:
            continue
        series[(r["engine"], r["method"], r["protocol"])][budget].append(r["score"])
    if not series:
        return None
    budgets = {b for pts in series.values() for b in pts}
    if len(budgets) == 1:  # one budget: a bar per method (a line plot would be a single column of dots)
        return _plot_score_bars(series, full, budgets.pop(), out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (engine, method, protocol), pts in sorted(series.items()):
        xs = sorted(pts)
        ys = [sum(pts[x]) / len(pts[x]) for x in xs]
        style = "--" if engine != "infercache" else "-"
        label = f"{method} ({protocol.replace('question_', 'q-')})" + ("" if engine == "infercache" else f" [{engine}]")
        ax.plot(xs, ys, style, marker="o", label=label)
    for engine, scores in full.items():
        ax.axhline(sum(scores) / len(scores), color="black", lw=1, ls=":", label=f"full cache [{engine}]")
    ax.set_xlabel("budget (fraction of context kept)")
    ax.set_ylabel("score (mean over tasks, lengths, samples)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_score_bars(series, full, budget: float, out: Path) -> Path:
    import matplotlib.pyplot as plt

    items = sorted(((engine, method, protocol), sum(v[budget]) / len(v[budget]))
                   for (engine, method, protocol), v in series.items())
    items.sort(key=lambda kv: (-kv[1], kv[0]))
    labels = [f"{m} ({p.replace('question_', 'q-')})" + ("" if e == "infercache" else f" [{e}]") for (e, m, p), _ in items]
    colors = ["tab:blue" if e == "infercache" else "tab:orange" for (e, _, _), _ in items]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(items) + 1.5))
    ax.barh(range(len(items)), [v for _, v in items], color=colors)
    ax.set_yticks(range(len(items)), labels, fontsize=7)
    ax.invert_yaxis()
    for engine, scores in full.items():
        ax.axvline(sum(scores) / len(scores), color="black", lw=1, ls=":", label=f"full cache [{engine}]")
    ax.set_xlim(0, 1.05)
    ax.set_xlabel(f"mean score at budget {budget:g}  (blue: infercache, orange: peer)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_needle_heatmap(records: list[dict], out: Path) -> Path | None:
    """Score by needle depth x context length, one panel per (method, budget), for the needle tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("kind") != "task" or r.get("depth") is None or r.get("score") is None or not r["task"].startswith("niah"):
            continue
        depth_bin = round(r["depth"] * 4) / 4
        cells[(r["engine"], r["method"], str(r["budget"]))][(depth_bin, r["length"])].append(r["score"])
    if not cells:
        return None
    panels = sorted(cells)
    cols = min(4, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    depths = sorted({d for p in panels for d, _ in cells[p]})
    lengths = sorted({n for p in panels for _, n in cells[p]})
    for ax, panel in zip(axes.flat, panels):
        grid = [[None] * len(lengths) for _ in depths]
        for (d, n), scores in cells[panel].items():
            grid[depths.index(d)][lengths.index(n)] = sum(scores) / len(scores)
        data = [[float("nan") if v is None else v for v in row] for row in grid]
        ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        engine, method, budget = panel
        ax.set_title(f"{method} {budget}" + ("" if engine == "infercache" else f" [{engine}]"), fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.supxlabel("context length (tokens)", fontsize=8)
    fig.supylabel("needle depth", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(records: list[dict], meta: dict, out_dir: Path) -> dict:
    """Write summary.json, results.md, score_vs_budget.png, needle_heatmap.png and report.html."""
    summary = summarize(records)
    (out_dir / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=2))
    table = markdown(summary, meta)
    (out_dir / "results.md").write_text(table)
    images = [p for p in (plot_score_vs_budget(summary, out_dir / "score_vs_budget.png"),
                          plot_needle_heatmap(records, out_dir / "needle_heatmap.png")) if p]
    body = [f"<h1>infercache bench: {html.escape(str(meta.get('model')))}</h1>",
            f"<p>{html.escape(json.dumps(meta))}</p>", _md_table_to_html(table)]
    for img in images:
        data = base64.b64encode(img.read_bytes()).decode()
        body.append(f'<h2>{html.escape(img.stem.replace("_", " "))}</h2><img src="data:image/png;base64,{data}">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>infercache bench</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{max-width:100%}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    (out_dir / "report.html").write_text(page)
    return summary


def _md_table_to_html(markdown_text: str) -> str:
    out, in_table = [], False
    for line in markdown_text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= {"-"}:
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
        else:
            if in_table:
                out.append("</table>")
                in_table = False
            if line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)
