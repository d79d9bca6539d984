"""Reports: a model's metrics as tables (evaluate, train), and the bench's outputs: report.md
(one row per artifact x backend x batch), pareto.png (accuracy against median latency) and
the demo's headline table, in the one table format of :mod:`edgediag.cli` (``Column``,
``format_table``; ``show`` prints a report, or with ``--json`` its JSON). Torch-free."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

from edgediag.cli import Column, format_table
from edgediag.utils import atomic_path

METRIC_COLUMNS = (Column("metric"), Column("value"))


def metric_rows(metrics: dict) -> list[dict]:
    """The scalar metrics of a model's evaluate() as ``{"metric", "value"}`` rows."""
    return [{"metric": k, "value": v} for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def metrics_text(metrics: dict) -> str:
    """A model's evaluate() report as tables: its scalar metrics, then its per-group rows
    (``metrics["table"]``: section/domain, class...) under the columns they have."""
    lines = [format_table(metric_rows(metrics), METRIC_COLUMNS)]
    groups = metrics.get("table") or []
    if groups:
        columns = [Column(c) for c in dict.fromkeys(c for r in groups for c in r)]
        lines += ["", format_table(groups, columns)]
    return "\n".join(lines)


# --- the bench's report -------------------------------------------------------------------------
BENCH_COLUMNS = (Column("model"), Column("variant"), Column("backend"), Column("batch"), Column("params", fmt=",d"),
                 Column("mflops_per_item", "MFLOPs/item"), Column("p50_ms", "p50 ms", ".3f"),
                 Column("p90_ms", "p90 ms", ".3f"), Column("items_per_s", "items/s", ".1f"), Column("metric"),
                 Column("value", fmt=".4f"), Column("auc", "AUC", ".4f"))


def bench_table_rows(rows: list[dict]) -> list[dict]:
    """The measured rows of report.json as the table shows them (keys of BENCH_COLUMNS)."""
    out = []
    for r in rows:
        if r["status"] != "ok":
            continue
        flops = r.get("flops_per_item")
        out.append({"model": r["model"], "variant": r["variant"], "backend": r["backend"], "batch": r["batch"],
                    "params": r.get("params_total"), "mflops_per_item": None if flops is None else flops / 1e6,
                    "p50_ms": r["latency_ms"]["p50"], "p90_ms": r["latency_ms"]["p90"],
                    "items_per_s": r["items_per_s"], "metric": r.get("metric_name") if r.get("metric") is not None
                    else None, "value": r.get("metric"), "auc": r.get("auc")})
    return out


def bench_notes(rows: list[dict], protocol: dict) -> list[str]:
    """What the figures of the table are, in sentences (report.md and the printed table)."""
    from edgediag.measure.cost import FLOPS_DEFINITION, PARAMS_DEFINITION
    from edgediag.measure.timing import protocol_line

    notes = [f"Latency: one call on a prepared batch; {protocol_line(protocol)}"
             + (" (preemption and stolen time left out)" if protocol.get("clock") == "cpu" else "") + ".",
             f"Params: {PARAMS_DEFINITION}; the same count for a checkpoint and its graph (export records it).",
             f"MFLOPs/item: {FLOPS_DEFINITION}."]
    skipped = [f"`{r['artifact']}` {r['backend']} batch {r['batch']}: skipped: {r['reason']}"
               for r in rows if r["status"] != "ok"]
    if skipped:
        notes += ["Skipped: " + "; ".join(skipped)]
    return notes


def markdown(rows: list[dict], env: dict, reference: dict | None = None, protocol: dict | None = None,
             memory: dict | None = None) -> str:
    protocol = protocol or {"threads": env["threads"], "warmup": 0, "runs": 0}
    lines = ["# edgediag benchmark", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} threads; torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']}, numpy {env['numpy']}; load average {env['load_avg_1m']} "
             "when it started.", "", format_table(bench_table_rows(rows), BENCH_COLUMNS, markdown=True)]
    for note in bench_notes(rows, protocol):
        lines += ["", note]
    if memory:
        lines += ["", f"Memory: the bench process peaked at {memory['rss_peak_mb']:.0f} MB resident (every artifact, "
                      "its runtime and the data in one process: not a per-model figure, so no column)."]
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
    threads = sorted({r.get("threads") for r in ok if r.get("threads")})
    on = f", {threads[0]} thread{'s' if threads[0] != 1 else ''}" if len(threads) == 1 else ""
    ax.set_xlabel(f"median latency, batch {batch}{on} (ms{', log scale' if ax.get_xscale() == 'log' else ''})")
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


HEADLINE_COLUMNS = (Column("model"), Column("variant"), Column("backend"), Column("params", fmt=",d"),
                    Column("mflops", "MFLOPs", ".1f"), Column("p50_ms", "p50 ms", ".2f"), Column("metric"),
                    Column("value", fmt=".3f"), Column("auc", "AUC", ".3f"))


def headline_table(rows: list[dict]) -> str:
    return format_table(rows, HEADLINE_COLUMNS)
