"""Admission by predicted wait against a real local stack (loadtest/overload.py)."""

from __future__ import annotations

import pytest

from loadtest.overload import run_row


@pytest.mark.slow
def test_at_ten_times_capacity_admitted_jobs_meet_the_slo_and_refusals_say_when_to_retry(tmp_path):
    """clipper-heavy sends every job straight to heavy and never degrades late ones: before
    admission by predicted wait its heavy queue grew without bound and admitted jobs missed the SLO."""
    row = run_row("clipper-heavy", 10, time_scale=0.5, duration_s=30, log_dir=str(tmp_path / "logs"))
    assert row["lost"] == 0
    assert row["accepted"] > 0 and row["refused"] > 0.5 * row["offered"], row
    assert row["refused_with_retry_after"] == row["refused"], row
    assert row["slo_met_share"] >= 0.95, row
    assert row["max_queue_wait_s"] <= row["slo_ms"] / 1000, row
