"""The first 20 training losses of three tiny configs match the stored ones (tests/golden/*.json).

A failure means training changed: a bug, or an intended change; then run
`python scripts/regenerate_golden.py` and review the JSON diff. Both sides train with one CPU thread:
thread counts change the reduction order, which moves quantized runs by up to ~1e-3 relative in 20
steps; with one thread a run is bitwise repeatable here. Another CPU (other SIMD kernels) may need
its own golden files.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = sorted(p.stem for p in (ROOT / "tests" / "golden").glob("*.json"))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        return importlib.import_module("regenerate_golden")
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_the_golden_files_are_the_scripts_cases(golden):
    assert CASES == sorted(golden.CASES) == ["adam_fp4", "gradient_stabilizer_none", "stable_spam_int4"]
    for name in CASES:
        stored = json.loads((ROOT / "tests" / "golden" / f"{name}.json").read_text())
        assert stored["overrides"] == [*golden.TINY, *golden.CASES[name]]
        assert stored["threads"] == golden.THREADS == 1 and len(stored["losses"]) == 20


@pytest.mark.usefixtures("keep_signal_handlers")
@pytest.mark.parametrize("name", CASES)
def test_training_reproduces_the_golden_losses(golden, name, tmp_path):
    stored = json.loads((ROOT / "tests" / "golden" / f"{name}.json").read_text())
    losses = golden.train_losses(stored["overrides"], tmp_path)
    assert losses == pytest.approx(stored["losses"], rel=1e-5, abs=0)
