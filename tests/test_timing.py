"""obslib.study.timing: the plausibility checks of speed measurements and the retry loop, on hand-made rows with a fake
clock, fake measurements and a fake idle check (no model, no sleeping)."""
import itertools

import numpy as np
import pandas as pd
import pytest

from obslib.study import timing

STEPS = 20
# the committed 07 dense row (loaded machine): pipeline 1.39 s < 20 x 71.9 ms, max 133.9 ms = 1.86 x median
LOADED_DENSE = {"transformer_ms": 71.94, "transformer_ms_min": 67.29, "transformer_ms_max": 133.94,
                "pipeline_s": 1.3896, "pipeline_s_min": 1.35, "pipeline_s_max": 1.45}
CLEAN = {"transformer_ms": 50.0, "transformer_ms_min": 48.0, "transformer_ms_max": 60.0,
         "pipeline_s": 1.4, "pipeline_s_min": 1.3, "pipeline_s_max": 1.6}


def test_clean_row_is_accepted():
    assert timing.timing_problems(CLEAN, STEPS) == []


def test_pipeline_faster_than_its_transformer_calls_is_rejected():
    row = dict(CLEAN, pipeline_s=0.9, pipeline_s_min=0.85, pipeline_s_max=1.0)  # 20 x 50 ms = 1.0 s > 0.9 s
    (p,) = timing.timing_problems(row, STEPS)
    assert "faster than its own 20 transformer calls" in p and "1.000 s" in p
    # the steps may come from the row itself; without steps the cross-check is not made
    assert len(timing.timing_problems(dict(row, steps=STEPS))) == 1
    assert timing.timing_problems(row) == []


def test_the_committed_loaded_dense_row_is_rejected_twice():
    problems = timing.timing_problems(LOADED_DENSE, STEPS)
    assert len(problems) == 2
    assert any("transformer_ms_max" in p and "1.86×" in p for p in problems)
    assert any("faster than its own" in p for p in problems)


@pytest.mark.parametrize("ratio,rejected", [(1.6, True), (1.5, False), (1.49, False)])
def test_maximum_above_one_and_a_half_medians_is_rejected(ratio, rejected):
    for med, mx in (("transformer_ms", "transformer_ms_max"), ("pipeline_s", "pipeline_s_max")):
        row = dict(CLEAN, **{mx: ratio * CLEAN[med]})
        problems = timing.timing_problems(row, STEPS)
        assert bool(problems) == rejected, (mx, problems)
        if rejected:
            assert mx in problems[0] and "1.60×" in problems[0]


def test_cuda_rows_and_non_positive_medians():
    assert timing.timing_problems({"dense_ms": 1.0, "dense_ms_max": 1.2, "sparse_2to4_ms": 0.8,
                                   "sparse_2to4_ms_max": 0.9}) == []
    assert len(timing.timing_problems({"dense_ms": 1.0, "dense_ms_max": 2.0})) == 1
    assert "not a positive time" in timing.timing_problems({"transformer_ms": 0.0})[0]
    assert timing.timing_problems(pd.Series(CLEAN), STEPS) == []  # a DataFrame row works as well


def test_idle_problems():
    assert timing.idle_problems(0.3, 0.02, cpus=2) == []
    assert "load average 2.50 > 2" in timing.idle_problems(2.5, 0.02, cpus=2)[0]
    assert "used 40% of the CPUs" in timing.idle_problems(0.3, 0.4, cpus=2)[0]
    assert timing.idle_problems(0.9, 0.02, cpus=2, max_load=0.5)  # an explicit threshold
    assert timing.idle_problems(float("nan"), float("nan"), cpus=2) == []  # no readings: nothing held against it
    assert timing.idle_problems(0.3, 0.9, cpus=2, max_busy=None) == []


def test_median_time_with_a_fake_clock():
    ticks = itertools.count()
    durations = iter([5.0, 1.0, 3.0, 2.0])  # the warm-up call (5) is not timed
    now = [0.0]

    def clock():
        next(ticks)
        return now[0]

    def fn():
        now[0] += next(durations)

    r = timing.median_time(fn, repeats=3, warmup=1, clock=clock)
    assert r == {"median_s": 2.0, "min_s": 1.0, "max_s": 3.0, "repeats": 3}
    assert next(ticks) == 6  # two clock reads per timed call


def _fake(rows, idles=None):
    """A measuring function returning ``rows`` in turn, an idle check returning ``idles`` in turn, a recording sleep."""
    calls = {"measure": 0, "sleeps": []}
    rows, idles = iter(rows), iter(idles or itertools.repeat({"load_1m": 0.2, "busy_share": 0.01, "problems": []}))

    def measure():
        calls["measure"] += 1
        return next(rows)

    return measure, (lambda: next(idles)), calls["sleeps"].append, calls


BAD_SPREAD = dict(CLEAN, transformer_ms_max=80.0)  # 1.6 x median


def test_retry_accepts_the_first_clean_attempt():
    measure, idle, sleep, calls = _fake([BAD_SPREAD, CLEAN, CLEAN])
    r = timing.measure_checked(measure, steps=STEPS, attempts=3, pause_s=7, idle=idle, sleep=sleep)
    assert calls["measure"] == 2 and calls["sleeps"] == [7]
    assert r["accepted"] is True and r["attempts"] == 2 and r["problems"] == ""
    assert r["transformer_ms_max"] == CLEAN["transformer_ms_max"]
    assert r["earlier_problems"].startswith("attempt 1: transformer_ms_max")
    assert r["load_at_start"] == 0.2 and r["busy_at_start"] == 0.01


def test_retry_gives_up_after_the_attempts_and_keeps_the_reasons():
    measure, idle, sleep, calls = _fake([BAD_SPREAD] * 5)
    r = timing.measure_checked(measure, steps=STEPS, attempts=3, pause_s=1, idle=idle, sleep=sleep)
    assert calls["measure"] == 3 and calls["sleeps"] == [1, 1]  # no pause after the last attempt
    assert r["accepted"] is False and r["attempts"] == 3
    assert "transformer_ms_max" in r["problems"] and r["earlier_problems"].count("attempt") == 2


def test_a_busy_machine_rejects_even_clean_numbers():
    busy = {"load_1m": 3.0, "busy_share": 0.6, "problems": timing.idle_problems(3.0, 0.6, cpus=2)}
    quiet = {"load_1m": 0.1, "busy_share": 0.0, "problems": []}
    measure, idle, sleep, calls = _fake([CLEAN, CLEAN], [busy, quiet])
    r = timing.measure_checked(measure, steps=STEPS, attempts=2, idle=idle, sleep=sleep)
    assert r["accepted"] is True and r["attempts"] == 2 and r["load_at_start"] == 0.1
    assert "machine not idle" in r["earlier_problems"]

    measure, idle, sleep, calls = _fake([CLEAN], [busy])
    r = timing.measure_checked(measure, steps=STEPS, attempts=1, idle=idle, sleep=sleep)
    assert r["accepted"] is False and "load average 3.00" in r["problems"] and calls["sleeps"] == []


def test_attempts_must_be_positive():
    with pytest.raises(ValueError):
        timing.measure_checked(lambda: CLEAN, attempts=0)


def test_speedups_and_comparison_with_flops():
    rows = [dict(LOADED_DENSE, variant="dense", params=100, gflops=5.0, accepted=False),
            dict(CLEAN, variant="pruned", params=80, gflops=4.0, accepted=True)]
    df = timing.add_speedups(pd.DataFrame(rows))
    p = df.iloc[1]
    assert p.params_removed == pytest.approx(0.2) and p.flops_ratio_inv == pytest.approx(1.25)
    assert p.transformer_speedup == pytest.approx(71.94 / 50.0)
    assert p.transformer_speedup_lo == pytest.approx(67.29 / 60.0)
    assert p.transformer_speedup_hi == pytest.approx(133.94 / 48.0)
    assert p.transformer_vs_flops == "at"  # 1.25 lies inside 1.12 .. 2.79
    assert not p.speedup_accepted  # the dense reference was rejected
    assert timing.compare_to_flops(1.3, 1.4, 1.25) == "above"
    assert timing.compare_to_flops(1.0, 1.1, 1.25) == "below"


def test_cpu_busy_share_is_a_share():
    b = timing.cpu_busy_share(0.05)
    assert b != b or 0.0 <= b <= 1.0  # NaN without /proc/stat
    assert timing.cpu_busy_share(0) != timing.cpu_busy_share(0)  # a zero window reads nothing
    assert set(timing.idle_check(window_s=0.05)) == {"load_1m", "busy_share", "cpus", "problems"}


def test_paired_times_alternate_and_give_per_pair_ratios():
    now, order = [0.0], []

    def fn():
        order.append("fn")
        now[0] += 1.0

    def ref():
        order.append("ref")
        now[0] += 2.0 + 0.5 * len(order)  # a reference that drifts slower: the ratio follows each pair

    r = timing.paired_times(fn, ref, repeats=4, warmup=1, clock=lambda: now[0])
    assert order[:2] == ["ref", "fn"] and order[2:4] == ["ref", "fn"] and order[4:6] == ["fn", "ref"]
    assert r["median_s"] == 1.0 and r["min_s"] == r["max_s"] == 1.0
    ref_times = [2.0 + 0.5 * n for n in (3, 6, 7, 10)]  # the reference's own times in pairs 1..4
    assert r["ratio"] == pytest.approx(float(np.median(ref_times))) and r["ratio_lo"] == 3.5 and r["ratio_hi"] == 7.0
    with pytest.raises(ValueError):
        timing.paired_times(fn, ref, repeats=0)


def test_a_speedup_is_quoted_only_where_the_paired_ratio_and_the_medians_agree():
    """Chapter 07's 30% row: per-pair median 1.165x faster while its median call (79.9 ms) was slower than dense's
    (74.8 ms): not quoted. A row whose ratio and medians agree is."""
    base = dict(transformer_ms_min=70.0, transformer_ms_max=90.0, pipeline_s=1.6, pipeline_s_min=1.5, pipeline_s_max=1.7,
                accepted=True)
    rows = [dict(base, variant="dense", kind="dense", params=100, gflops=5.0, transformer_ms=74.8),
            dict(base, variant="30%", kind="nominal", params=87, gflops=4.2, transformer_ms=79.9,
                 paired_transformer_speedup=1.165, paired_transformer_speedup_lo=0.9, paired_transformer_speedup_hi=1.3),
            dict(base, variant="g30", kind="budget", params=85, gflops=4.0, transformer_ms=61.3,
                 paired_transformer_speedup=1.156, paired_transformer_speedup_lo=1.0, paired_transformer_speedup_hi=1.3)]
    df = timing.add_speedups(pd.DataFrame(rows)).set_index("variant")
    assert df.loc["30%", "transformer_speedup"] == pytest.approx(1.165)
    assert df.loc["30%", "transformer_medians_ratio"] == pytest.approx(74.8 / 79.9)
    assert not df.loc["30%", "transformer_quoted"] and df.loc["g30", "transformer_quoted"]
