"""Compare strategies: learning curves (mean ± std over seeds), AUBC with 95 % intervals,
and each strategy's paired per-seed gain over random. Plain rows in, files out.

AUBC here is the plain mean of test accuracy over the cycles' budgets (every cycle adds the
same number of labels, so it equals the normalized trapezoid area up to the end points).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

CURVE_COLUMNS = ["experiment", "strategy", "seed", "n_labeled", "test_accuracy"]


def _t95(n: int) -> float:
    """Two-sided 95 % Student t quantile for n samples (n-1 degrees of freedom)."""
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (nan for a single value)."""
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return float(arr.mean()), float("nan")
    return float(arr.mean()), _t95(len(arr)) * float(arr.std(ddof=1)) / math.sqrt(len(arr))


def summarize(rows: list[dict]) -> dict:
    """rows: strategy, seed, n_labeled, test_accuracy. Returns curves, AUBC and paired gains."""
    by_run: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in rows:
        by_run[(r["strategy"], int(r["seed"]))][int(r["n_labeled"])] = float(r["test_accuracy"])
    strategies = sorted({s for s, _ in by_run}, key=lambda s: (s != "random", s))
    budgets = sorted({n for curve in by_run.values() for n in curve})
    curves, aubc, gains = {}, {}, {}
    for s in strategies:
        seeds = sorted(seed for st, seed in by_run if st == s)
        curves[s] = {n: [by_run[(s, seed)][n] for seed in seeds if n in by_run[(s, seed)]] for n in budgets}
        aubc[s] = {seed: float(np.mean(list(by_run[(s, seed)].values()))) for seed in seeds}
    if "random" in aubc:
        for s in strategies:
            paired = sorted(set(aubc[s]) & set(aubc["random"]))
            gains[s] = {seed: aubc[s][seed] - aubc["random"][seed] for seed in paired}
    return {"strategies": strategies, "budgets": budgets, "curves": curves, "aubc": aubc, "gains": gains,
            "runs": dict(by_run)}


def _aubc_texts(summary: dict, strategy: str) -> tuple[str, str]:
    """AUBC "mean ± CI" and the paired gain over random ("–" for random itself), as both the
    markdown table and the HTML report print them."""
    mean, half = mean_ci(list(summary["aubc"][strategy].values()))
    aubc_text = f"{mean:.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}")
    gain = summary["gains"].get(strategy)
    if not gain or strategy == "random":
        return aubc_text, "–"
    g_mean, g_half = mean_ci(list(gain.values()))
    return aubc_text, f"{g_mean:+.4f}" + ("" if math.isnan(g_half) else f" ± {g_half:.4f}")


def markdown_table(summary: dict) -> str:
    budgets, lines = summary["budgets"], []
    lines.append("| strategy | seeds | " + " | ".join(f"{n}" for n in budgets)
                 + " | AUBC (mean ± 95 % CI) | paired AUBC gain over random |")
    lines.append("|---" * (len(budgets) + 4) + "|")
    for s in summary["strategies"]:
        cells = []
        for n in budgets:
            vals = summary["curves"][s][n]
            cells.append(f"{np.mean(vals):.4f}" if vals else "–")
        aubc_text, gain_text = _aubc_texts(summary, s)
        lines.append(f"| {s} | {len(summary['aubc'][s])} | " + " | ".join(cells) + f" | {aubc_text} | {gain_text} |")
    lines.append("")
    lines.append("Columns under the budgets are mean test accuracy over seeds at that number of labels. "
                 "AUBC: mean test accuracy over the cycles. Intervals: 95 % Student t over seeds "
                 "(none with one seed).")
    return "\n".join(lines) + "\n"


def labels_to_reach(curve: dict[int, float], target: float) -> float | None:
    """The labels at which a mean learning curve first reaches `target`, interpolated linearly
    between budgets; None if it never does (the curve is read as it rises, budget by budget)."""
    points = sorted(curve.items())
    for i, (n, acc) in enumerate(points):
        if acc >= target:
            if i == 0:
                return float(n)
            n0, a0 = points[i - 1]
            return n0 + (n - n0) * (target - a0) / (acc - a0)
    return None


def labels_to_reach_table(summary: dict) -> str:
    """How many labels each strategy needs for random's final accuracy: the label saving.

    Paired like the AUBC gain: for each strategy, both mean curves are taken over the seeds that
    it and random share, so a seed only one of them has cannot tilt the comparison.
    """
    if "random" not in summary["curves"]:
        return ""
    runs = summary["runs"]
    last = max(summary["budgets"])
    lines = ["| strategy | seeds | random's final accuracy on those seeds | labels to reach it | vs random |",
             "|---|---|---|---|---|"]
    for s in summary["strategies"]:
        seeds = sorted(set(summary["aubc"][s]) & set(summary["aubc"]["random"]))
        seeds = [sd for sd in seeds if last in runs[("random", sd)]]
        if not seeds:
            continue
        target = float(np.mean([runs[("random", sd)][last] for sd in seeds]))
        budgets = sorted(set.intersection(*(set(runs[(s, sd)]) for sd in seeds)))
        curve = {n: float(np.mean([runs[(s, sd)][n] for sd in seeds])) for n in budgets}
        n = labels_to_reach(curve, target)
        text = "not reached" if n is None else f"{n:,.0f}"
        saving = "–" if n is None or s == "random" else f"{(n - last) / last:+.1%} labels"
        lines.append(f"| {s} | {len(seeds)} | {target:.4f} at {last} | {text} | {saving} |")
    lines += ["", "Mean curves over the seeds each strategy shares with random, interpolated linearly between "
              "budgets; \"not reached\": the strategy's mean stays below it up to the last budget.", ""]
    return "\n".join(lines)


def plot_curves(summary: dict, path: str | Path, title: str = "Learning curves") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    # Random is the gray dashed reference; every other strategy gets a distinct non-gray colour.
    palette = [c for c in matplotlib.colormaps["tab20"].colors if len(set(c)) > 1]
    palette = palette[::2] + palette[1::2]
    others = iter(palette)
    for s in summary["strategies"]:
        xs = [n for n in summary["budgets"] if summary["curves"][s][n]]
        mean = np.array([np.mean(summary["curves"][s][n]) for n in xs])
        std = np.array([np.std(summary["curves"][s][n]) for n in xs])
        style = {"linestyle": "--", "color": "gray"} if s == "random" else {"color": next(others)}
        ax.plot(xs, mean, marker="o", label=f"{s} (n={len(summary['aubc'][s])})", **style)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.12, color=style["color"])
    ax.set_xlabel("labeled samples")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def html_report(summary: dict, png: str | Path, runs: list[dict], path: str | Path) -> Path:
    """One self-contained HTML file (opens from disk): the plot embedded, the AUBC table with
    intervals and paired gains, and a link to each experiment's MLflow run.

    runs: dicts with experiment, strategy, seed, url (the run's page in the MLflow UI)."""
    import base64
    import html

    from tidal.workspace import atomic_write_text

    image = base64.b64encode(Path(png).read_bytes()).decode()
    head = "".join(f"<th>{n}</th>" for n in summary["budgets"])
    body = []
    for s in summary["strategies"]:
        cells = "".join(f"<td>{np.mean(v):.4f}</td>" if (v := summary["curves"][s][n]) else "<td>–</td>"
                        for n in summary["budgets"])
        aubc_text, gain_text = _aubc_texts(summary, s)
        body.append(f"<tr><td>{html.escape(s)}</td><td>{len(summary['aubc'][s])}</td>{cells}"
                    f"<td class=\"aubc\">{aubc_text}</td><td>{gain_text}</td></tr>")
    links = "".join(f"<li><a href=\"{html.escape(r['url'])}\">{html.escape(r['experiment'])}: "
                    f"{html.escape(r['strategy'])}, seed {r['seed']}</a></li>"
                    for r in sorted(runs, key=lambda r: (r["strategy"], r["seed"], r["experiment"])))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TiDAL learning curves</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} td:first-child{{text-align:left}}</style></head>
<body><h1>Learning curves</h1>
<img id="curves" alt="learning curves" src="data:image/png;base64,{image}">
<h2>Accuracy by number of labels, AUBC</h2>
<table id="aubc"><tr><th>strategy</th><th>seeds</th>{head}<th>AUBC (mean ± 95 % CI)</th>
<th>paired AUBC gain over random</th></tr>
{"".join(body)}
</table>
<p>Budgets: mean test accuracy over seeds at that number of labels. AUBC: mean test accuracy over the
cycles. Intervals: 95 % Student t over seeds (none with one seed).</p>
<h2>MLflow runs</h2><ul id="runs">{links}</ul>
</body></html>
"""
    atomic_write_text(path, page)
    return Path(path)
