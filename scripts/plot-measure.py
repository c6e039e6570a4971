#!/usr/bin/env python3
"""Renders the plots of `dysco-migrate measure` from the CSVs it wrote into DIR.

Usage: scripts/plot-measure.py DIR

Reads DIR/latency.csv, DIR/phases.csv and DIR/goodput.csv and writes
  DIR/latency-cdf.png  per-session migration latency CDF, stateful vs stateless (whole migration, and the
                       paper's measure: new-path SYN sent -> first use of the new path)
  DIR/phases.png       per-phase breakdown: p50 bars with p90 and p99 marks, per mode
  DIR/goodput.png      goodput per bundle in 100 ms bins over time, one panel per mode, the migration marked
With DIR/cdf.csv (`measure --experiment removal`) latency-cdf.png is the removal-latency CDF (the paper's
measure and the whole removal) with the paper's two points (80 % under 2 ms, 98.7 % under 4 ms) marked, and
goodput.png marks each bundle's own removal.
Needs matplotlib (Debian: python3-matplotlib; `make setup` installs it). Renders with the Agg backend (no display).
"""
import csv
import os
import sys

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as error:
    sys.exit(f"plot-measure: matplotlib is missing ({error}); install python3-matplotlib (make setup)")

MODE_COLOURS = {"stateful": "tab:blue", "stateless": "tab:orange"}
PHASES = ["lock", "newPath", "drain", "state", "export", "transfer", "import", "release", "teardown", "paper", "total"]
PHASE_LABELS = {"newPath": "new path", "paper": "paper\n(SYN→used)", "total": "total"}
# The paper's §5 middlebox deletion (Fig. 13): 80 % of removals under 2 ms, 98.7 % under 4 ms.
PAPER_DELETION = [(2.0, 0.80), (4.0, 0.987)]


def save(fig, directory, name):
    fig.tight_layout()
    fig.savefig(os.path.join(directory, name))
    plt.close(fig)


def rows(directory, name):
    with open(os.path.join(directory, name), newline="") as handle:
        return list(csv.DictReader(handle))


def removal_cdf(directory):
    data = rows(directory, "cdf.csv")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for measure, style, label in (("paper", "-", "paper's measure (new-path SYN → new path used)"),
                                  ("total", "--", "whole removal (trigger → release)")):
        points = [(int(r["latency_us"]) / 1000, float(r["fraction"])) for r in data if r["measure"] == measure]
        if not points:
            continue
        xs = [0.0] + [x for x, _ in points]
        ys = [0.0] + [y for _, y in points]
        ax.step(xs, ys, style, where="post", linewidth=2, label=f"this run: {label}")
    ax.scatter([x for x, _ in PAPER_DELETION], [y for _, y in PAPER_DELETION], marker="o", s=60, color="tab:red",
               zorder=4, label="the paper (Fig. 13): 80 % < 2 ms, 98.7 % < 4 ms")
    for x, y in PAPER_DELETION:
        ax.annotate(f"{y * 100:g} % < {x:g} ms", xy=(x, y), xytext=(6, -14), textcoords="offset points",
                    fontsize="small", color="tab:red")
    ax.set_title("Middlebox removal latency per session (CDF; fw1 a forwarding box, not a proxy)")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of removed sessions")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    save(fig, directory, "latency-cdf.png")


def latency_cdf(directory):
    if os.path.exists(os.path.join(directory, "cdf.csv")):
        removal_cdf(directory)
        return
    data = rows(directory, "latency.csv")
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for mode in sorted({r["mode"] for r in data}):
        for column, style, label in (("total_us", "-", "whole migration"), ("paper_us", "--", "paper's measure")):
            values = sorted(float(r[column]) / 1000 for r in data if r["mode"] == mode and r["result"] == "moved" and r[column])
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, style, where="post", color=MODE_COLOURS.get(mode), linewidth=2,
                    label=f"{mode}: {label} (n={len(values)})")
    ax.set_title("Per-session migration latency (CDF)")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of migrated sessions")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    save(fig, directory, "latency-cdf.png")


def phases(directory):
    data = rows(directory, "phases.csv")
    modes = sorted({r["mode"] for r in data})
    by = {(r["mode"], r["phase"]): r for r in data}
    fig, ax = plt.subplots(figsize=(10, 5), dpi=110)
    width = 0.8 / max(1, len(modes))
    for m, mode in enumerate(modes):
        xs, p50, p90, p99 = [], [], [], []
        for i, phase in enumerate(PHASES):
            r = by.get((mode, phase))
            if r is None or int(r["count"]) == 0:
                continue
            x = i - 0.4 + width * (m + 0.5)
            xs.append(x)
            p50.append(float(r["p50_us"]) / 1000)
            p90.append(float(r["p90_us"]) / 1000)
            p99.append(float(r["p99_us"]) / 1000)
        colour = MODE_COLOURS.get(mode)
        ax.bar(xs, p50, width, color=colour, alpha=0.85, label=f"{mode} p50")
        ax.scatter(xs, p90, marker="_", s=220, color="black", zorder=3, label="p90" if m == 0 else None)
        ax.scatter(xs, p99, marker="v", s=30, color="tab:red", zorder=3, label="p99" if m == 0 else None)
    ax.set_xticks(range(len(PHASES)))
    ax.set_xticklabels([PHASE_LABELS.get(p, p) for p in PHASES])
    ax.set_title("Migration latency by phase (per session; export/transfer/import are parts of state)")
    ax.set_xlabel("phase")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    save(fig, directory, "phases.png")


def goodput(directory):
    data = rows(directory, "goodput.csv")
    modes = sorted({r["mode"] for r in data})
    fig, axes = plt.subplots(len(modes), 1, figsize=(10, 3.6 * max(1, len(modes))), dpi=110, squeeze=False, sharex=True)
    for ax, mode in zip(axes[:, 0], modes):
        mine = [r for r in data if r["mode"] == mode]
        for bundle in sorted({int(r["bundle"]) for r in mine}):
            series = [r for r in mine if int(r["bundle"]) == bundle]
            host = series[0]["host"]
            migrated = series[0]["migrated"] == "1"
            xs = [(float(r["bin_start_s"]) + float(r["bin_end_s"])) / 2 for r in series]
            ys = [float(r["mib_per_s"]) for r in series]
            if mode == "removal":
                start, end = float(series[0]["window_start_s"]), float(series[0]["window_end_s"])
                line, = ax.plot(xs, ys, linewidth=1.4, label=f"bundle {bundle + 1} ({host}) — fw1 removed at {start:.2f} s")
                # Each bundle's own removal, in its colour.
                ax.axvspan(start, max(end, start + 0.02), color=line.get_color(), alpha=0.25)
                ax.axvline(start, color=line.get_color(), linewidth=1, linestyle="--")
                continue
            ax.plot(xs, ys, linewidth=1.6 if migrated else 1.1,
                    label=f"bundle {bundle + 1} ({host}){' — migrated fw1 → fw2' if migrated else ' — stays on fw1'}")
        if mode != "removal":
            start, end = float(mine[0]["window_start_s"]), float(mine[0]["window_end_s"])
            ax.axvspan(start, max(end, start + 0.02), color="tab:red", alpha=0.25, label=f"migration ({(end - start) * 1000:.0f} ms)")
            ax.axvline(start, color="tab:red", linewidth=1, linestyle="--")
        # A catch-up burst after a stall can be many times the paced rate: keep the steady rate readable and
        # write the clipped peak next to it.
        values = sorted(float(r["mib_per_s"]) for r in mine if r["phase"] in ("before", "after") and float(r["mib_per_s"]) > 0)
        peak = max(float(r["mib_per_s"]) for r in mine)
        top = 3 * values[len(values) // 2] if values else peak
        if peak > top > 0:
            at = next(r for r in mine if float(r["mib_per_s"]) == peak)
            ax.annotate(f"peak {peak:.0f} MiB/s", xy=((float(at["bin_start_s"]) + float(at["bin_end_s"])) / 2, top),
                        xytext=(8, -14), textcoords="offset points", fontsize="small", color="dimgray",
                        arrowprops={"arrowstyle": "->", "color": "dimgray"})
            ax.set_ylim(0, top * 1.05)
        else:
            ax.set_ylim(bottom=0)
        ax.set_title("Goodput per bundle, fw1 removed from one bundle after the other (100 ms bins, at the receiver)"
                     if mode == "removal" else f"Goodput per bundle, {mode} migration (100 ms bins, at the receiver)")
        ax.set_ylabel("goodput (MiB/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    axes[-1, 0].set_xlabel("time since the downloads started (s)")
    save(fig, directory, "goodput.png")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    latency_cdf(directory)
    phases(directory)
    goodput(directory)


if __name__ == "__main__":
    main()
