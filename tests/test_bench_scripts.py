"""The benchmark scripts run end to end and report every optimizer against the AdamW measured in
the same run (their timings are not asserted: speed is measured by the scripts, not by tests)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("compile_flag", [[], ["--compile", "--only", "stable_spam_compiled"]])
def test_bench_optimizer_reports_each_optimizer_as_a_ratio_to_adamw(compile_flag):
    out = subprocess.run(
        [sys.executable, "scripts/bench_optimizer.py", "--device", "cpu", "--sizes", "tiny", "--steps", "1",
         "--warmup", "1", "--repeats", "1", *compile_flag],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = json.loads(out)["sizes"]["tiny"]["optimizers"]
    expected = {"adamw", "stable_spam_compiled"} if compile_flag else {
        "adamw", "stable_spam", "stable_spam_official", "spam", "lion", "lion_adagn_adaclip",
        "adam_mini", "adafactor"}
    assert set(rows) == expected
    base = rows["adamw"]["ms_per_step"]
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["first_warmup_s"] >= 0
        assert row["vs_adamw"] == pytest.approx(row["ms_per_step"] / base, abs=0.006)
