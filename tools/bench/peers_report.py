#!/usr/bin/env python3
"""Summary of a peers.sh run: best figures with their spread, vpmfs's ratios to each peer, the
goals of issue 12 with their figures, and a chart. Usage: peers_report.py DIR TITLE"""
import csv
import statistics
import subprocess
import sys
from collections import defaultdict

out, title = sys.argv[1], sys.argv[2]
LOWER_IS_BETTER = {"sync_p50_us", "flushes_per_sync"}
figures = defaultdict(list)  # (target, workload, metric) -> values
by_rep = {}  # (rep, target, workload, metric) -> value
targets, rows = [], []
with open(f"{out}/raw.csv") as f:
    for r in csv.DictReader(f):
        key = (r["target"], r["workload"], r["metric"])
        try:
            figures[key].append(float(r["value"]))
            by_rep[(r["rep"],) + key] = float(r["value"])
        except ValueError:
            continue  # a workload that failed on that target left no figure
        if r["target"] not in targets:
            targets.append(r["target"])
        if (r["workload"], r["metric"]) not in rows:
            rows.append((r["workload"], r["metric"]))


def best(t, w, m):
    v = figures.get((t, w, m))
    if not v:
        return None
    return min(v) if m in LOWER_IS_BETTER else max(v)


def spread(t, w, m):
    v = figures.get((t, w, m))
    b = best(t, w, m)
    if not v or not b:
        return 0.0
    return (max(v) - min(v)) / b * 100


def fmt(x):
    if x is None:
        return "–"
    if x >= 10000:
        return f"{x / 1000:.1f}k"
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def ratio(a, b, m):
    """How many times better a is than b (higher: a is better), or None."""
    if a is None or b is None or a == 0 or b == 0:
        return None
    return b / a if m in LOWER_IS_BETTER else a / b


def paired(a, b, w, m):
    """The median of a's ratio to b within each repetition (a and b ran within a minute of each
    other there, where the best figures may come from different moments of the machine), or
    None."""
    reps = sorted({k[0] for k in by_rep if k[1:] == (a, w, m)})
    rs = [r for r in (ratio(by_rep.get((i, a, w, m)), by_rep.get((i, b, w, m)), m) for i in reps)
          if r is not None]
    return statistics.median(rs) if rs else None


lines = [f"# vpmfs and its peers", "", f"{title}. Best of the repetitions; ± is the spread "
         "(max − min) / best.", ""]
lines.append("| workload | metric | " + " | ".join(targets) + " |")
lines.append("|---|---|" + "---:|" * len(targets))
for w, m in rows:
    cells = []
    for t in targets:
        b = best(t, w, m)
        cells.append("–" if b is None else f"{fmt(b)} ±{spread(t, w, m):.0f}%")
    lines.append(f"| {w} | {m} | " + " | ".join(cells) + " |")

# vpmfs (default options, /dev/shm) against each peer; the writeback-cache and disk variants
# against their own counterparts.
pairs = [("vpmfs", p) for p in ("tmpfs", "ptll", "ptll_wb", "fuse2fs") if p in targets]
pairs += [(a, b) for a, b in (("vpmfs_sync", "ptll"), ("vpmfs_sync", "fuse2fs"),
                              ("vpmfs_wbc", "ptll_wb"), ("vpmfs_disk", "disk"),
                              ("vpmfs_disk", "vpmfs"), ("vpmfs_disk_wbc", "ptll_wb"),
                              ("vpmfs", "base"), ("vpmfs_disk", "base_disk"))
          if a in targets and b in targets]
lines += ["", "## Ratios (higher: vpmfs better; latencies and flushes inverted)", "",
          "Ratio of the best figures, then in brackets the median of the ratios within each "
          "repetition (the two ran within a minute of each other; the best figures may come from "
          "different moments of the machine).", ""]
lines.append("| workload | metric | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
lines.append("|---|---|" + "---:|" * len(pairs))
chart = []
for w, m in rows:
    cells = []
    for a, b in pairs:
        r = ratio(best(a, w, m), best(b, w, m), m)
        p = paired(a, b, w, m)
        cells.append("–" if r is None else f"{r:.2f}×" + ("" if p is None else f" ({p:.2f}×)"))
    lines.append(f"| {w} | {m} | " + " | ".join(cells) + " |")
    if m not in ("flushes_per_sync",):
        chart.append((f"{w} {m}".replace("_per_s", "").replace("_us", ""),
                      [ratio(best(a, w, m), best(b, w, m), m) for a, b in pairs]))


def verdict(value, ok):
    # A goal whose targets were not in this run is not measured, neither met nor missed.
    return "not measured" if value is None else ("met" if ok else "missed")


def goal(text, value, target, within=None):
    shown = "–" if value is None else f"{value:.2f}"
    if value is not None and within is not None:
        shown += f" ({within:.2f})"
    lines.append(f"| {text} | {shown} | ≥ {target} | "
                 f"{verdict(value, value is not None and value >= target)} |")


def goal_pair(text, a, b, w, m, target):
    goal(text, ratio(best(a, w, m), best(b, w, m), m), target, paired(a, b, w, m))


lines += ["", "## Goals of issue 12", "",
          "Figure: the ratio of the best figures (in brackets: the median within repetitions).",
          "", "| goal | figure | target | |", "|---|---:|---:|---|"]
B = best
goal_pair("1. randwrite vpmfs / ptll", "vpmfs", "ptll", "randwrite", "IOPS", 1.0)
goal_pair("1. randwrite vpmfs / fuse2fs", "vpmfs", "fuse2fs", "randwrite", "IOPS", 5.0)
for w in ("fsync1", "fsync8"):
    goal_pair(f"2. {w} vpmfs / ptll", "vpmfs", "ptll", w, "IOPS", 1.0)
    goal_pair(f"2. {w} vpmfs / fuse2fs", "vpmfs", "fuse2fs", w, "IOPS", 3.0)
    # The opt-in -o sync: each write durable when answered, fsync without a round trip.
    goal_pair(f"2. {w} vpmfs_sync / ptll (-o sync)", "vpmfs_sync", "ptll", w, "IOPS", 1.0)
    goal_pair(f"2. {w} vpmfs_sync / fuse2fs (-o sync)", "vpmfs_sync", "fuse2fs", w, "IOPS", 3.0)
goal("3. disk: fsync8 / fsync1", ratio(B("vpmfs_disk", "fsync8", "IOPS"),
                                       B("vpmfs_disk", "fsync1", "IOPS"), "IOPS"), 3.0)
goal_pair("3. disk: vpmfs fdatasync1 / plain fdatasync loop", "vpmfs_disk", "disk", "fdatasync1",
          "IOPS", 0.4)
for w, limit in (("fsync1", 2.0), ("fsync8", 0.5)):
    f = B("vpmfs_disk", w, "flushes_per_sync")
    lines.append(f"| 3. disk: device flushes per fsync, {w} | {fmt(f)} | ≤ {limit} | "
                 f"{verdict(f, f is not None and f <= limit)} |")
goal_pair("3. disk randwrite / shm randwrite", "vpmfs_disk", "vpmfs", "randwrite", "IOPS", 0.8)
for w, m in (("seqwrite", "MiB/s"), ("seqread", "MiB/s"), ("randread", "IOPS"),
             ("meta", "create_per_s"), ("meta", "stat_per_s"), ("meta", "unlink_per_s")):
    goal_pair(f"4. {w} {m} vpmfs / ptll", "vpmfs", "ptll", w, m, 1.0)
for w, m in (("randwrite", "IOPS"), ("seqwrite", "MiB/s")):
    goal_pair(f"5. {w} vpmfs_wbc / ptll_wb", "vpmfs_wbc", "ptll_wb", w, m, 1.0)

with open(f"{out}/summary.md", "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))

# The chart: one group of bars per workload, one bar per pair, log scale around 1×.
with open(f"{out}/ratios.dat", "w") as f:
    f.write("workload " + " ".join(f'"{a}/{b}"' for a, b in pairs) + "\n")
    for name, values in chart:
        f.write(f'"{name}" ' + " ".join("NaN" if v is None else f"{v:.4f}" for v in values) + "\n")
# One colour per pair: gnuplot's default cycle repeats after eight.
colours = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d",
           "#666666", "#1f78b4", "#b2df8a", "#fb9a99", "#cab2d6", "#000000", "#ffff99"]
colour_list = " ".join(colours)
script = f"""
set terminal pngcairo noenhanced size 1400,700 font ",10"
set output "{out}/peers.png"
set title "vpmfs ÷ peer ({title})"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y 2
set yrange [0.01:100]
set ylabel "ratio (higher: vpmfs better)"
set xtics rotate by -35 scale 0
set key outside right top
set grid ytics
set arrow from graph 0, first 1 to graph 1, first 1 nohead lw 2 lc rgb "black"
colours = "{colour_list}"
plot for [i=2:{len(pairs) + 1}] "{out}/ratios.dat" using i:xtic(1) title columnhead(i) \
  lc rgb word(colours, (i - 2) % words(colours) + 1)
"""
try:
    subprocess.run(["gnuplot"], input=script, text=True, check=True)
except (OSError, subprocess.CalledProcessError) as e:
    print(f"peers_report: no chart ({e})", file=sys.stderr)
