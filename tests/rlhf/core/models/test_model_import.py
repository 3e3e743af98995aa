"""`distilrl import-model` from a Hugging Face directory (GGUF files: tests/e2e/test_real_model.py), and its
refusals."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf.core.models.build import build_tokenizer, load_student  # noqa: E402
from rlhf.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Qwen2 saved with its tokenizer and a chat template, in float32."""
    tokenizer = build_tokenizer("char")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("source")
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_directory_is_resaved_with_its_tokenizer_and_template(source, tmp_path, capsys):
    out = tmp_path / "imported"
    assert main(["import-model", str(source), str(out), "--dtype", "bfloat16"]) == 0
    assert "Qwen2ForCausalLM" in capsys.readouterr().out
    model, tokenizer = load_student(out)  # the checks a run makes on model.model_name_or_path
    original, _ = load_student(source)
    assert tokenizer.chat_template == "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    saved = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert saved.dtype == torch.bfloat16
    for name, weight in original.state_dict().items():
        assert torch.equal(saved.state_dict()[name], weight.to(torch.bfloat16)), name


def test_bad_sources_and_an_existing_target_are_refused_in_one_line(source, tmp_path, capsys):
    assert main(["import-model", str(tmp_path / "nothing.gguf"), str(tmp_path / "a")]) == 2
    assert "neither a .gguf file nor a Hugging Face model directory" in capsys.readouterr().err
    assert main(["import-model", str(source), str(source)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1
