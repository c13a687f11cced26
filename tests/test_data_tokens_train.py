"""train.py with `data=tokens` on a prepared copy of the bundled sample: one and two processes, bad inputs."""
from __future__ import annotations


import pytest
from rich.console import Console

from data import DataConfig
from data.prepare import prepare
from test_data_tokens import other_tokenizer
from test_train_e2e import assert_two_processes_match_one, command, run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    output = tmp_path_factory.mktemp("sample-tokens")
    prepare(DataConfig(), output, workers=2, shards={"train": None, "validation": None}, console=Console(quiet=True))
    return output


def test_two_processes_match_one_process_on_prepared_tokens(prepared, tmp_path):
    overrides = ["data=tokens", f"data.path={prepared}", "data.num_workers=1", "trainer.max_steps=4",
                 "checkpoint.every=0"]
    stdout = assert_two_processes_match_one(tmp_path, overrides, timeout=180)
    assert "data tokens seq 32 packed" in stdout and "done: 4 steps, validation perplexity" in stdout


def test_a_tokenizer_other_than_the_manifests_fails_with_one_line(prepared, tmp_path):
    other = f"data.tokenizer={other_tokenizer(tmp_path / 'other.model')}"
    result = run(command(tmp_path / "run", "data=tokens", f"data.path={prepared}", "trainer.max_steps=2", other),
                 timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is not the tokenizer" in errors[0] and "manifest.json" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
