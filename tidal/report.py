"""Compare strategies: learning curves (mean ± std over seeds), AUBC with 95 % intervals,
and each strategy's paired per-seed gain over random (the mean accuracy difference over the budgets
both runs of a seed have: their AUBC difference once both are complete). Plain rows in, files out;
`check_one_protocol` refuses rows that are not one protocol.

AUBC here is the plain mean of the accuracy (test or validation split) over the cycles' budgets
(every cycle adds the same number of labels, so it equals the normalized trapezoid area up to the
end points).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

CURVE_COLUMNS = ["experiment", "strategy", "seed", "n_labeled", "accuracy"]


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


# Keys only some strategies read (the TD module's, Learning Loss's, BALD's): they may differ
# between strategies, since random's train.td_weight means nothing, but not between the seeds of
# one strategy, which the table averages.
STRATEGY_OWN_KEY_PREFIXES = ("train.td_", "train.lloss_", "bald_")
# What a comparison compares (strategy, seed) and what names or versions a run, not its protocol.
COMPARED_KEYS = {"experiment", "study", "strategy", "seed", "data_version"}


NOT_LOGGED = "(not logged)"  # the value a run that did not log a key shows for it


class NotComparable(ValueError):
    """The runs of a comparison do not share one protocol, or repeat a strategy and seed."""


def check_one_protocol(rows: list[dict], unchanged_result_keys: set[str]) -> None:
    """Refuse to average runs that are not one protocol. rows: learning-curve rows with
    experiment, strategy, seed and `params` (the run's flat params as MLflow stores them).

    Runs may differ in strategy, seed, experiment name and `unchanged_result_keys` (keys, or
    top-level prefixes, that never change a result: experiment.RESUMABLE_KEYS); a strategy's own
    keys may differ between strategies only. A strategy and seed held by two experiments would
    be averaged as one run, so that is refused too. A key one run logged and another did not is
    a difference too."""
    runs = {r["run_id"]: r for r in rows}
    owners: dict[tuple[str, int], list[str]] = defaultdict(list)
    for r in runs.values():
        owners[(r["strategy"], int(r["seed"]))].append(r["experiment"])
    repeated = {k: v for k, v in owners.items() if len(v) > 1}
    if repeated:
        (strategy, seed), names = sorted(repeated.items())[0]
        raise NotComparable(
            f"strategy {strategy} seed {seed} is in {len(names)} experiments ({', '.join(sorted(names))}); "
            "a comparison averages the seeds of each strategy, so each strategy and seed may come from one "
            "experiment only: choose them with --experiment NAME (repeatable)")

    def protocol_key(key: str) -> bool:
        return (key not in COMPARED_KEYS and key not in unchanged_result_keys
                and key.split(".")[0] not in unchanged_result_keys)

    def differing(group: list[dict], keys: set[str]) -> dict[str, dict[str, list[str]]]:
        found = {}
        for key in sorted(keys):
            values: dict[str, list[str]] = defaultdict(list)
            for r in group:
                values[r["params"].get(key, NOT_LOGGED)].append(r["experiment"])
            if len(values) > 1:
                found[key] = values
        return found

    all_keys = {k for r in runs.values() for k in r["params"] if protocol_key(k)}
    own = {k for k in all_keys if k.startswith(STRATEGY_OWN_KEY_PREFIXES)}
    found = differing(list(runs.values()), all_keys - own)
    for strategy in sorted({r["strategy"] for r in runs.values()}):
        found.update(differing([r for r in runs.values() if r["strategy"] == strategy], own))
    if found:
        shown = "; ".join(f"{key}: " + ", ".join(f"{value} ({', '.join(sorted(names)[:3])}"
                                                 + (", ..." if len(names) > 3 else "") + ")"
                                                 for value, names in sorted(values.items()))
                          for key, values in list(found.items())[:5])
        raise NotComparable(
            f"the experiments do not share one protocol, so their curves cannot be averaged together: "
            f"{shown}{' (and more)' if len(found) > 5 else ''}. Compare one protocol at a time: "
            "--experiment NAME (repeatable)")


def summarize(rows: list[dict], split: str = "test") -> dict:
    """rows: strategy, seed, n_labeled, accuracy. Returns curves, AUBC and paired gains.
    `split` names what the accuracy was measured on ("validation" when the runs held one out:
    `validation_size`), for the tables' and the plot's wording."""
    by_run: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for r in rows:
        by_run[(r["strategy"], int(r["seed"]))][int(r["n_labeled"])] = float(r["accuracy"])
    strategies = sorted({s for s, _ in by_run}, key=lambda s: (s != "random", s))
    budgets = sorted({n for curve in by_run.values() for n in curve})
    curves, aubc, gains = {}, {}, {}
    for s in strategies:
        seeds = sorted(seed for st, seed in by_run if st == s)
        curves[s] = {n: [by_run[(s, seed)][n] for seed in seeds if n in by_run[(s, seed)]] for n in budgets}
        aubc[s] = {seed: float(np.mean(list(by_run[(s, seed)].values()))) for seed in seeds}
    if "random" in aubc:
        for s in strategies:
            gains[s] = paired_gains(by_run, s, "random")
    return {"strategies": strategies, "budgets": budgets, "curves": curves, "aubc": aubc, "gains": gains,
            "runs": dict(by_run), "split": split}


def paired_gains(runs: dict[tuple[str, int], dict[int, float]], strategy: str, baseline: str,
                 from_budget: int | None = None) -> dict[int, float]:
    """Per seed both have, `strategy`'s mean accuracy minus `baseline`'s over the budgets both runs
    have: their AUBC difference when both are complete, and still a fair one while one is some
    cycles behind. `from_budget`: count only budgets from there on. runs: summarize()'s "runs"."""
    gains = {}
    for (s, seed), curve in sorted(runs.items()):
        if s != strategy or (baseline, seed) not in runs:
            continue
        base = runs[(baseline, seed)]
        shared = [n for n in sorted(set(curve) & set(base)) if from_budget is None or n >= from_budget]
        if shared:
            gains[seed] = float(np.mean([curve[n] - base[n] for n in shared]))
    return gains


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
    split = summary.get("split", "test")
    lines.append(f"Columns under the budgets are mean {split} accuracy over seeds at that number of labels. "
                 f"AUBC: mean {split} accuracy over the cycles. Intervals: 95 % Student t over seeds "
                 "(none with one seed).")
    return "\n".join(lines) + "\n"


# Each TiDAL score against the plain score it builds on: what the TD module adds.
TIDAL_COUNTERPARTS = [("tidal-entropy", "entropy"), ("tidal-margin", "margin")]


def counterpart_table(summary: dict, pairs: list[tuple[str, str]] = TIDAL_COUNTERPARTS) -> str:
    """Paired AUBC difference of each strategy against another one (not random), over all cycles
    and over the queried cycles only (budgets after the first); "" when no pair is present."""
    first_queried = sorted(summary["budgets"])[1] if len(summary["budgets"]) > 1 else None
    lines = ["| strategy | against | seeds | paired AUBC difference (mean ± 95 % CI) | the same over cycles ≥ 1 |",
             "|---|---|---|---|---|"]
    for strategy, baseline in pairs:
        diffs = list(paired_gains(summary["runs"], strategy, baseline).values())
        if not diffs:
            continue
        texts = []
        for values in (diffs, list(paired_gains(summary["runs"], strategy, baseline, first_queried).values())):
            mean, half = mean_ci(values) if values else (math.nan, math.nan)
            texts.append("–" if not values else f"{mean:+.4f}" + ("" if math.isnan(half) else f" ± {half:.4f}"))
        lines.append(f"| {strategy} | {baseline} | {len(diffs)} | {texts[0]} | {texts[1]} |")
    if len(lines) == 2:
        return ""
    return "\n".join(lines + ["", "Per seed both have: the strategy's mean accuracy minus the other's over the budgets "
                              "both runs have; mean ± 95 % Student t interval over those seeds.", ""])


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
    ax.set_ylabel(f"{summary.get('split', 'test')} accuracy")
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
    split = html.escape(summary.get("split", "test"))
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
<p>Budgets: mean {split} accuracy over seeds at that number of labels. AUBC: mean {split} accuracy over the
cycles. Intervals: 95 % Student t over seeds (none with one seed).</p>
<h2>MLflow runs</h2><ul id="runs">{links}</ul>
</body></html>
"""
    atomic_write_text(path, page)
    return Path(path)


def write_report(rows: list[dict], out: str | Path, run_url: Callable[[dict], str]) -> dict[str, Path]:
    """`tidal compare`'s files from the learning-curve rows of one protocol: the plot
    (learning_curves.png), the table (.md), the curves (.csv) and report.html linking each run
    (`run_url(row)`: its page in the MLflow UI). Returns their paths by kind."""
    from tidal.workspace import atomic_write_text, write_csv

    out = Path(out)
    # One protocol (checked before), so one validation_size: the split the accuracies are on.
    split = "validation" if any(r["params"].get("validation_size", "0") != "0" for r in rows) else "test"
    summary = summarize(rows, split)
    png = plot_curves(summary, out / "learning_curves.png", title=", ".join(sorted({r["experiment"] for r in rows}))[:60])
    md = out / "learning_curves.md"
    atomic_write_text(md, markdown_table(summary))
    curves = out / "learning_curves.csv"
    write_csv(curves, CURVE_COLUMNS, [{k: r[k] for k in CURVE_COLUMNS}
                                      for r in sorted(rows, key=lambda r: (r["strategy"], r["seed"], r["n_labeled"]))])
    runs = {r["run_id"]: {"experiment": r["experiment"], "strategy": r["strategy"], "seed": r["seed"],
                          "url": run_url(r)} for r in rows}
    page = html_report(summary, png, list(runs.values()), out / "report.html")
    return {"plot": png, "table": md, "curves": curves, "report": page}
