"""The `hf/` export is a complete Hugging Face model: weights, config and tokenizer load with the
Auto classes (as lm-eval's `hf` model does), encode like our tokenizer and generate."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import data
import train

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")


def test_export_loads_with_auto_classes_and_generates(tmp_path, tiny_config):
    cfg = tiny_config(tmp_path, "trainer.max_steps=2", "checkpoint.export_hf=true")
    train.train(cfg)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ours = data.build_tokenizer(cfg.data)
    text = "The committee met on Tuesday to discuss the new railway."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer(text)["input_ids"] == ours.encode([text])[0], "documents end with EOS, as in training"
    assert ids == ours.encode([text])[0][:-1]
    prompt = torch.tensor([ids])
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, len(ids) + 5)
    assert isinstance(tokenizer.decode(generated[0, len(ids):]), str)
