"""broker.dev.bench: rounds — a row is a set-up's median run, a ratio the median of the ratios within rounds."""

from __future__ import annotations

import argparse

import pytest

from broker.dev.bench.__main__ import Measured, Run, median_ratios, median_run, parse_args, ratios, report
from broker.dev.bench.loadgen import Result


def run(rps: float, cpu_us: float | None) -> Run:
    result = Result(
        rps=rps, p50_ms=10.0, p99_ms=20.0, errors=0, status_counts={200: int(rps)}, answered=int(rps)
    )
    return Run(Measured(result, True, cpu_us, 0.99, 0.0, 0.5))


def test_the_median_run_is_a_real_run_of_median_cpu() -> None:
    runs = [run(700, 1400), run(500, 1900), run(650, 1500)]
    assert median_run(runs) is runs[2]
    assert median_run(runs[:1]) is runs[0]
    # without CPU figures (unpinned on one core): by rps
    loose = [run(700, None), run(500, None), run(650, None)]
    assert median_run(loose) is loose[2]


def test_ratios_are_taken_within_a_round_then_the_median() -> None:
    # the machine is 30 % slower in round 2: whole-run ratios mixing rounds would be off, within-round ones not
    rounds = [
        {"bare": run(2000, 300).main, "broker": run(700, 1200).main},
        {"bare": run(1400, 420).main, "broker": run(490, 1680).main},
        {"bare": run(2100, 290).main, "broker": run(600, 1300).main},
    ]
    found = median_ratios(rounds, ratios)
    assert found == {"broker/bare": pytest.approx(0.35, abs=0.001)}
    # a set-up missing from a round (failed there) is taken from the rounds it ran in
    rounds[1].pop("broker")
    assert median_ratios(rounds, ratios)["broker/bare"] == pytest.approx((0.35 + 600 / 2100) / 2, abs=0.001)


def test_report_gives_every_round_and_median_figures(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse_args(["--rounds", "3"])
    outcomes: dict[str, list[Run] | str] = {
        "bare": [run(2000, 300), run(1400, 420), run(2100, 290)],
        "broker": [run(700, 1200), run(490, 1680), run(600, 1300)],
        "broker-redis": "broker-redis did not become ready",
    }
    doc = report(outcomes, args)
    assert doc["setups"]["broker"]["cpu_us_per_request"] == 1300  # the median run
    assert [row["rps"] for row in doc["setups"]["broker"]["rounds"]] == [700, 490, 600]
    assert doc["ratios"]["broker/bare"] == pytest.approx(0.35, abs=0.001)
    assert doc["ratios_cpu"]["broker/bare"] == pytest.approx(0.25, abs=0.001)
    assert doc["setups"]["broker-redis"] == {"failed": "broker-redis did not become ready"}
    assert doc["meta"]["rounds"] == 3
    assert "broker-redis       FAILED" in capsys.readouterr().out


def test_rounds_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    assert isinstance(parse_args([]), argparse.Namespace) and parse_args([]).rounds == 1
