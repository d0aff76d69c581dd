"""``kdfast bench --plot``: the size sweeps of a results file drawn per provider.

One PNG per swept op next to the JSON lines (``<results>_<op>.png``), three panels against
the swept size: time per forward + backward, effective GB/s (the case's minimal memory
traffic over the time; the machine's copy bandwidth measured in the same run as a dashed
line, and as the right axis: the fraction of it; above 1 the working set fits in a
cache), and peak extra memory. Needs matplotlib.
"""
from __future__ import annotations

import json
from collections import defaultdict


def load_records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def sweep_groups(records: list[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """Timings of sweeps, grouped by what a plot holds fixed (op, dtype, device, the other
    shape keys), then by provider, sorted by the swept size."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r.get("kind") != "timing" or not r.get("sweep") or "median_ms" not in r:
            continue
        fixed = tuple(sorted((k, v) for k, v in r["shape"].items() if k != r["sweep"]))
        groups[(r["op"], r["sweep"], r["dtype"], r["device"], fixed)][r["provider"]].append(r)
    for providers in groups.values():
        for rows in providers.values():
            rows.sort(key=lambda r: r["shape"][r["sweep"]])
    return groups


def plot_results(path: str) -> list[str]:
    """Draw every sweep of the results file ``path``; returns the PNG files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    sizes = FuncFormatter(lambda v, _: f"{v / 1024:g}k" if v >= 1024 else f"{v:g}")

    written = []
    stem = path[:-len(".jsonl")] if path.endswith(".jsonl") else path
    groups = sweep_groups(load_records(path))
    for (op, sweep, dtype, device, fixed), providers in groups.items():
        fig, (ax_time, ax_gbps, ax_mem) = plt.subplots(1, 3, figsize=(16, 4.6))
        copy_gbps = None
        for provider, rows in sorted(providers.items()):
            x = [r["shape"][sweep] for r in rows]
            ours = provider.startswith("kdfast")
            style = dict(marker="o", linewidth=2.2 if ours else 1.2, zorder=3 if ours else 2, label=provider)
            ax_time.plot(x, [r["median_ms"] for r in rows], **style)
            if all("effective_gbps" in r for r in rows):
                ax_gbps.plot(x, [r["effective_gbps"] for r in rows], **style)
            if all("peak_extra_mb" in r for r in rows):
                ax_mem.plot(x, [r["peak_extra_mb"] for r in rows], **style)
            copy_gbps = copy_gbps or next((r["copy_gbps"] for r in rows if r.get("copy_gbps")), None)
        if copy_gbps:
            ax_gbps.axhline(copy_gbps, color="grey", linestyle="--", linewidth=1, label="copy bandwidth")
            ax_gbps.secondary_yaxis("right", functions=(lambda g: g / copy_gbps, lambda f: f * copy_gbps)) \
                .set_ylabel("fraction of copy bandwidth")
        for ax, ylabel in ((ax_time, "ms (forward + backward, median)"), (ax_gbps, "effective GB/s"),
                           (ax_mem, "peak extra memory (MB)")):
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(sizes)
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(sweep)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_time.set_yscale("log")
        ax_mem.set_yscale("symlog", linthresh=0.1)  # 0 MB (nothing beyond the output) stays on the plot
        ax_mem.set_ylim(bottom=0)
        ax_gbps.set_ylim(bottom=0)
        ax_time.legend(fontsize=8)
        some = next(iter(providers.values()))[0]
        fixed_text = ", ".join(f"{k}={v}" for k, v in fixed)
        fig.suptitle(f"{op} ({fixed_text}, {dtype}) on {device}, kdfast {some.get('kdfast_commit', '?')}", fontsize=10)
        fig.tight_layout()
        one_per_op = sum(key[0] == op for key in groups) == 1
        name = f"{stem}_{op}.png" if one_per_op else f"{stem}_{op}_{sweep}_{dtype}_{len(written)}.png"
        fig.savefig(name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written
