"""The bench's human-readable outputs: report.md (one table row per artifact x backend x
batch), pareto.png (accuracy against median latency) and the demo's headline table."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

from edgediag.utils import atomic_path


def markdown(rows: list[dict], env: dict, reference: dict | None = None) -> str:
    head = ["model", "variant", "backend", "batch", "params", "MFLOPs/item", "p50 ms", "p90 ms", "items/s",
            "RSS MB", "metric", "AUC"]
    lines = ["# edgediag benchmark", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads; torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']}, numpy {env['numpy']}; load average {env['load_avg_1m']} "
             "when it started.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    skipped = []
    for r in rows:
        if r["status"] != "ok":
            skipped.append(f"- `{r['artifact']}` {r['backend']} batch {r['batch']}: skipped: {r['reason']}")
            continue
        lat = r["latency_ms"]
        metric = "n/a" if r.get("metric") is None else f"{r['metric_name']} {r['metric']:.4f}"
        mflops = "n/a" if r.get("flops_per_item") is None else f"{r['flops_per_item'] / 1e6:.2f}"
        params = "n/a" if r.get("params_total") is None else f"{r['params_total']:,}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['batch']} | {params} | {mflops} | "
                     f"{lat['p50']:.3f} | {lat['p90']:.3f} | {r['items_per_s']:.1f} | {r['rss_peak_mb']:.0f} | "
                     f"{metric} | {'n/a' if r.get('auc') is None else format(r['auc'], '.4f')} |")
    if skipped:
        lines += ["", "Skipped:", *skipped]
    clocks = {r.get("clock", "wall") for r in rows if r["status"] == "ok"}
    what = ("CPU time of the timing thread (one thread; preemption and stolen time left out)" if clocks == {"cpu"}
            else "wall time")
    lines += ["", f"Latency: {what} of one call on a prepared batch, after the warm-up; RSS: the process's "
              "peak resident memory during the timed runs (models, runtime and data included)."]
    shares = [(r["cpu_share"], r) for r in rows if r["status"] == "ok" and "cpu_share" in r]
    busy = [(share, r) for share, r in shares if share < 0.9]
    if busy:
        share, r = min(busy, key=lambda t: t[0])
        lines += ["", f"Contention: on {len(busy)} of {len(shares)} rows the timing thread ran less than 90 % of "
                  f"the wall time (least: {100 * share:.0f} %, {r['model']} {r['variant']} {r['backend']}): the "
                  "machine was busy or its virtual CPU stolen. `--clock cpu` leaves that time out."]
    elif shares:
        lines += ["", "The timing thread ran at least 90 % of the wall time on every row (no contention seen)."]
    if reference:
        lines += ["", f"Reference kernel ({reference['what']}), timed in the same rounds: p50 "
                  f"{reference['p50']:.3f} ms: how fast the machine's plain compute was (`relative_p50` in "
                  "report.json divides each p50 by it)."]
    return "\n".join(lines) + "\n"


def pareto_png(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    batch = min((r["batch"] for r in ok), default=1)
    ok = [r for r in ok if r["batch"] == batch]
    # One y axis for all points: AUC when every row has it (a checkpoint's own metric and a
    # graph's score metric can differ in kind), else each row's metric.
    y_key = "auc" if ok and all(r.get("auc") is not None for r in ok) else "metric"
    ok = [{**r, "y": r[y_key]} for r in ok if r.get(y_key) is not None]
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=120)
    colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(dict.fromkeys(r["model_name"] for r in ok))}
    markers = {"eager": "o", "onnxruntime": "s", "tensorrt": "^"}
    biggest = max((r.get("params_total") or 1 for r in ok), default=1)
    for r in ok:  # colour: model, marker: backend, fill: original (filled) or pruned (hollow)
        size = 60 + 440 * math.sqrt((r.get("params_total") or 1) / biggest)
        pruned = r["variant"] == "pruned"
        ax.scatter(r["latency_ms"]["p50"], r["y"], s=size, marker=markers.get(r["backend"], "o"), alpha=0.8,
                   facecolors="white" if pruned else colours[r["model_name"]],
                   edgecolors=colours[r["model_name"]] if pruned else "black", linewidths=1.6 if pruned else 0.6)
    # Text only where colour, marker and fill leave two points ambiguous (two runs of a model):
    # their artifact folders; labels cycle through offsets so close points stay readable.
    seen = collections.Counter((r["model_name"], r["variant"], r["backend"]) for r in ok)
    offsets = [(10, 10), (10, -16), (-10, 22), (-10, -28)]
    ambiguous = [r for r in ok if seen[(r["model_name"], r["variant"], r["backend"])] > 1]
    for i, r in enumerate(sorted(ambiguous, key=lambda r: r["latency_ms"]["p50"])):
        dx, dy = offsets[i % len(offsets)]
        ax.annotate(Path(r["artifact"]).parent.name or r["artifact"], (r["latency_ms"]["p50"], r["y"]),
                    textcoords="offset points", xytext=(dx, dy), fontsize=7.5, ha="left" if dx > 0 else "right",
                    arrowprops={"arrowstyle": "-", "color": "grey", "linewidth": 0.5})
    for name in colours:  # original -> pruned of one model family and backend, as a line
        for backend in markers:
            pts = sorted((r for r in ok if r["model_name"] == name and r["backend"] == backend),
                         key=lambda r: r["variant"] != "original")
            if len(pts) > 1 and {p["variant"] for p in pts} == {"original", "pruned"}:
                ax.plot([p["latency_ms"]["p50"] for p in pts], [p["y"] for p in pts], "--",
                        color=colours[name], linewidth=1.2)
    for name, colour in colours.items():
        ax.scatter([], [], color=colour, label=name, s=60)
    for backend, marker in markers.items():
        if any(r["backend"] == backend for r in ok):
            ax.scatter([], [], color="grey", marker=marker, label=backend, s=60)
    ax.scatter([], [], color="grey", edgecolors="black", linewidths=0.6, label="original", s=60)
    ax.scatter([], [], facecolors="white", edgecolors="grey", linewidths=1.6, label="pruned", s=60)
    names = ["AUC"] if y_key == "auc" else sorted({r["metric_name"] for r in ok})
    lat = [r["latency_ms"]["p50"] for r in ok]
    if lat and max(lat) > 10 * min(lat):  # latencies over decades: a log axis keeps all visible
        ax.set_xscale("log")
    ax.set_xlabel(f"median latency, batch {batch} (ms{', log scale' if ax.get_xscale() == 'log' else ''})")
    ax.set_ylabel("accuracy: " + ", ".join(names))
    ax.set_title("accuracy vs latency (marker size = parameters; dashed: original -> pruned)")
    ax.grid(alpha=0.3)
    if ok:
        # outside the axes, so it never covers a point
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, framealpha=0.8, borderaxespad=0.0)
        ax.margins(x=0.25, y=0.15)
    else:
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")  # the legend outside the axes included
    plt.close(fig)


def headline_rows(report_json: Path) -> list[dict]:
    """One line per model x variant x backend from the bench report (batch 1)."""
    rows = json.loads(report_json.read_text())["rows"]
    keep = []
    for r in rows:
        if r.get("status") != "ok" or r.get("batch") != 1:
            continue
        keep.append({"model": r["model"], "variant": r["variant"], "backend": r["backend"],
                     "params": r.get("params_total"), "mflops": None if r.get("flops_per_item") is None
                     else r["flops_per_item"] / 1e6, "p50_ms": r["latency_ms"]["p50"],
                     "metric": r.get("metric_name"), "value": r.get("metric"), "auc": r.get("auc")})
    return keep


def headline_table(rows: list[dict]) -> str:
    head = (f"{'model':<18} {'variant':<8} {'backend':<11} {'params':>10} {'MFLOPs':>8} {'p50 ms':>8} "
            f"{'metric':>8} {'value':>6} {'AUC':>6}")
    lines = [head, "-" * len(head)]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "n/a"
    for r in rows:
        lines.append(f"{r['model']:<18} {r['variant']:<8} {r['backend']:<11} {fmt(r['params'], ',d'):>10} "
                     f"{fmt(r['mflops'], '.1f'):>8} {fmt(r['p50_ms'], '.2f'):>8} {str(r['metric']):>8} "
                     f"{fmt(r['value'], '.3f'):>6} {fmt(r['auc'], '.3f'):>6}")
    return "\n".join(lines)
