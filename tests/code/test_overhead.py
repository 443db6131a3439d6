"""benchmarks/overhead.py: the rotation of variants and the overhead arithmetic (with a fake runner;
the real runner is the pipeline and the flow, exercised by the integration tests)."""
from __future__ import annotations


def test_rounds_rotate_variants_and_ratios_use_medians(tmp_path, benchmark_script):
    overhead = benchmark_script("overhead")
    seconds = {"library": [10.0, 12.0, 11.0], "flow-untracked": [11.0, 11.5, 30.0], "flow": [12.0, 13.0, 12.5]}
    calls = []

    def fake(variant, name, runs_dir, overrides):
        calls.append((variant, name))
        if name == "warm-up":
            return 40.0
        rnd = int(name.rsplit("-r", 1)[1])
        return seconds[variant][rnd]

    result = overhead.measure(tmp_path, 3, ["preset=debug"], run=fake)
    assert calls[0] == ("flow", "warm-up")
    firsts = [calls[1][0], calls[4][0], calls[7][0]]
    assert firsts == ["library", "flow-untracked", "flow"]  # each variant leads one round
    assert len({name for _, name in calls}) == len(calls)  # every experiment is a new workspace
    assert result["cold_start_s"] == 40.0
    assert result["median_s"] == {"library": 11.0, "flow-untracked": 11.5, "flow": 12.5}
    assert abs(result["total_overhead"] - (12.5 / 11.0 - 1)) < 1e-12
    assert abs(result["prefect_overhead"] + result["mlflow_overhead"] - result["total_overhead"]) < 1e-12
    overhead.write_report(tmp_path, result, "python benchmarks/overhead.py --rounds 3")
    text = (tmp_path / "README.md").read_text()
    assert "| flow | 12.5 | 12.0, 13.0, 12.5 | 1.136× |" in text
    assert "+13.6 %" in text
    load = result["load_avg_1min"]
    assert f"at start / end: {load['start']:.2f} / {load['end']:.2f} on {result['cpu_count']} cores." in text
