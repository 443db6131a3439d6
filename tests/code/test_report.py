"""Comparison statistics on hand-built learning curves whose answers are known."""
from __future__ import annotations

import math

import pytest

from tidal.report import (NotComparable, check_one_protocol, labels_to_reach, labels_to_reach_table, markdown_table,
                          mean_ci, summarize)


def _rows(strategy: str, seed: int, accs: list[float], start: int = 100, step: int = 100) -> list[dict]:
    return [{"strategy": strategy, "seed": seed, "n_labeled": start + i * step, "accuracy": a}
            for i, a in enumerate(accs)]


def test_mean_ci_matches_student_t():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.3027, sd = 1, n = 3
    assert mean == 2.0
    assert half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(mean_ci([0.5])[1])


def test_aubc_and_paired_gain():
    rows = (_rows("random", 0, [0.5, 0.7]) + _rows("random", 1, [0.6, 0.8])
            + _rows("tidal-entropy", 0, [0.6, 0.8]) + _rows("tidal-entropy", 1, [0.6, 0.9]))
    s = summarize(rows)
    assert s["strategies"] == ["random", "tidal-entropy"]  # random first, as the reference
    assert s["aubc"]["random"] == {0: pytest.approx(0.6), 1: pytest.approx(0.7)}
    assert s["aubc"]["tidal-entropy"] == {0: pytest.approx(0.7), 1: pytest.approx(0.75)}
    assert s["gains"]["tidal-entropy"] == {0: pytest.approx(0.1), 1: pytest.approx(0.05)}
    assert s["curves"]["tidal-entropy"][200] == [0.8, 0.9]


def test_gain_is_paired_by_seed_only():
    rows = _rows("random", 0, [0.5]) + _rows("entropy", 0, [0.6]) + _rows("entropy", 1, [0.9])
    assert summarize(rows)["gains"]["entropy"] == {0: pytest.approx(0.1)}


def test_gain_while_a_run_is_cycles_behind_counts_only_the_budgets_both_have():
    """Mid-grid, random has 3 cycles and entropy 2: comparing AUBCs over different budgets would
    charge entropy for the missing, higher third point; the gain compares like with like."""
    rows = _rows("random", 0, [0.5, 0.6, 0.9]) + _rows("entropy", 0, [0.55, 0.65])
    assert summarize(rows)["gains"]["entropy"] == {0: pytest.approx(0.05)}


def test_runs_on_a_validation_split_are_not_called_test_accuracy(tmp_path):
    from tidal.report import html_report, plot_curves

    summary = summarize(_rows("random", 0, [0.5, 0.6]), split="validation")
    assert "mean validation accuracy over seeds" in markdown_table(summary)
    assert "test accuracy" not in markdown_table(summary)
    page = html_report(summary, plot_curves(summary, tmp_path / "c.png"), [], tmp_path / "r.html").read_text()
    assert "mean validation accuracy" in page and "test accuracy" not in page


def test_tidal_is_paired_with_its_plain_score_over_all_cycles_and_the_queried_ones():
    from tidal.report import counterpart_table

    rows = (_rows("entropy", 0, [0.50, 0.60, 0.70]) + _rows("entropy", 1, [0.40, 0.50, 0.60])
            + _rows("tidal-entropy", 0, [0.56, 0.62, 0.72]) + _rows("tidal-entropy", 1, [0.46, 0.52, 0.62])
            + _rows("margin", 0, [0.5, 0.6, 0.7]))
    table = counterpart_table(summarize(rows))
    line = [c.strip() for c in next(li for li in table.splitlines() if li.startswith("| tidal-entropy")).split("|")]
    # seed 0: (0.06 + 0.02 + 0.02) / 3 = 0.0333, seed 1 the same; cycles >= 1: 0.02 on both
    assert line[2:6] == ["entropy", "2", "+0.0333 ± 0.0000", "+0.0200 ± 0.0000"]
    assert "tidal-margin" not in table  # no pair without both strategies
    assert counterpart_table(summarize(_rows("random", 0, [0.5]))) == ""


def _run(experiment: str, strategy: str, seed: int, **params: str) -> list[dict]:
    flat = {"experiment": experiment, "strategy": strategy, "seed": str(seed), "dataset": "digits",
            "budget": "100", "train.td_weight": "1.0", "device": "auto", "scoring.shards": "1",
            "data_version": f"v-{experiment}", **params}
    return [{**r, "experiment": experiment, "run_id": f"run-{experiment}", "params": flat}
            for r in _rows(strategy, seed, [0.5, 0.6])]


def test_one_protocol_lets_strategy_seed_and_result_neutral_keys_differ():
    rows = (_run("r0", "random", 0, device="cpu") + _run("t0", "tidal-entropy", 0, **{"train.td_weight": "2.0"})
            + _run("t1", "tidal-entropy", 1, **{"train.td_weight": "2.0", "scoring.shards": "4"}))
    check_one_protocol(rows, {"device", "scoring"})  # no error: nothing but the allowed keys differ


def test_a_protocol_key_that_differs_is_named_with_its_experiments():
    rows = _run("r0", "random", 0) + _run("e0", "entropy", 0, budget="50") + _run("e1", "entropy", 1, budget="50")
    with pytest.raises(NotComparable, match=r"budget: 100 \(r0\), 50 \(e0, e1\)"):
        check_one_protocol(rows, set())


def test_a_strategys_own_key_may_not_differ_between_its_seeds():
    rows = _run("t0", "tidal-entropy", 0) + _run("t1", "tidal-entropy", 1, **{"train.td_weight": "2.0"})
    with pytest.raises(NotComparable, match=r"train.td_weight: 1.0 \(t0\), 2.0 \(t1\)"):
        check_one_protocol(rows, set())


def test_one_strategy_and_seed_from_two_experiments_is_refused():
    rows = _run("a", "entropy", 0) + _run("b", "entropy", 0)
    with pytest.raises(NotComparable, match=r"strategy entropy seed 0 is in 2 experiments \(a, b\)"):
        check_one_protocol(rows, set())


def test_a_key_one_run_did_not_log_is_a_difference():
    rows = _run("r0", "random", 0) + _run("e0", "entropy", 0, eval_hflip="True")
    with pytest.raises(NotComparable, match=r"eval_hflip: \(not logged\) \(r0\), True \(e0\)"):
        check_one_protocol(rows, set())


def test_runs_on_two_pools_are_refused_by_their_pool_version():
    rows = _run("r0", "random", 0, pool_version="md5-a") + _run("e0", "entropy", 0, pool_version="md5-b")
    with pytest.raises(NotComparable, match=r"pool_version: md5-a \(r0\), md5-b \(e0\)"):
        check_one_protocol(rows, set())


def test_markdown_table_shows_a_losing_method_as_negative():
    rows = _rows("random", 0, [0.8, 0.9]) + _rows("random", 1, [0.8, 0.9]) \
        + _rows("entropy", 0, [0.7, 0.8]) + _rows("entropy", 1, [0.7, 0.8])
    table = markdown_table(summarize(rows))
    line = next(l for l in table.splitlines() if l.startswith("| entropy"))
    assert "-0.1000 ± 0.0000" in line
    assert "| 0.7000 | 0.8000 |" in line


def test_labels_to_reach_interpolates_and_says_when_never():
    curve = {100: 0.5, 200: 0.6, 300: 0.7}
    assert labels_to_reach(curve, 0.65) == pytest.approx(250.0)
    assert labels_to_reach(curve, 0.5) == 100.0
    assert labels_to_reach(curve, 0.71) is None


def test_labels_to_reach_table_shows_the_saving_against_random_on_shared_seeds():
    curves = {("random", 0): {100: 0.5, 200: 0.6, 300: 0.7}, ("random", 1): {100: 0.6, 200: 0.8, 300: 0.9},
              ("good", 0): {100: 0.5, 200: 0.7, 300: 0.8}, ("bad", 0): {100: 0.4, 200: 0.5, 300: 0.6}}
    rows = [{"strategy": s, "seed": sd, "n_labeled": n, "accuracy": a}
            for (s, sd), curve in curves.items() for n, a in curve.items()]
    table = labels_to_reach_table(summarize(rows))
    # good and bad only have seed 0: random's target is its seed-0 final accuracy, not the mean of 2
    assert "| good | 1 | 0.7000 at 300 | 200 | -33.3% labels |" in table
    assert "| bad | 1 | 0.7000 at 300 | not reached | – |" in table
    assert "| random | 2 | 0.8000 at 300 | 300 | – |" in table


def test_html_report_holds_the_markdown_tables_numbers_and_run_links(tmp_path):
    from tidal.report import html_report, markdown_table, plot_curves, summarize

    rows = [{"strategy": s, "seed": seed, "n_labeled": n, "accuracy": acc + 0.01 * seed}
            for s, acc in (("random", 0.5), ("entropy", 0.55)) for seed in (0, 1) for n in (100, 200)]
    summary = summarize(rows)
    png = plot_curves(summary, tmp_path / "c.png")
    runs = [{"experiment": "e", "strategy": "entropy", "seed": 0, "url": "http://127.0.0.1:5000/#/x"}]
    page = html_report(summary, png, runs, tmp_path / "r.html").read_text()
    md = markdown_table(summary)
    for line in md.splitlines()[2:4]:  # the strategies' rows: AUBC and gain texts appear verbatim
        aubc, gain = [c.strip() for c in line.split("|")][-3:-1]
        assert f">{aubc}<" in page and f">{gain}<" in page
    assert 'href="http://127.0.0.1:5000/#/x"' in page and "data:image/png;base64," in page
