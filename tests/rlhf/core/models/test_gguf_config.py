"""``model.model_name_or_path`` pointing at a .gguf file (rlhf/core/models/model_import.py ``student_from_gguf``): the run
imports it once into a directory beside the run directories and every actor loads that Hugging Face directory.

The GGUF file is written here with the gguf package from a tiny random Qwen2 (byte-level BPE vocabulary, one
merge, a chat template), so the test needs no downloaded model (tests/e2e/test_real_model.py runs a real one).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf", reason="reading GGUF files needs the gguf package: pip install gguf")
pytest.importorskip("ray")

from rlhf.core.models import model_import  # noqa: E402
from rlhf.core.config.run_config import load_config  # noqa: E402
from rlhf.cli import main  # noqa: E402
from tests.paths import REPO  # noqa: E402

TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
# llama.cpp's leaf names for a Qwen2 layer's modules.
_GGUF_LEAVES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


def write_tiny_qwen2_gguf(path: Path) -> dict[str, torch.Tensor]:
    """A 1-layer Qwen2 (hidden 16) as an fp32 GGUF file at ``path``; returns its weights."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # The byte alphabet, one merged token (transformers reads merges only from a file that has some) and EOS.
    tokens = list(bytes_to_unicode().values()) + ["12", "<|endoftext|>"]
    config = transformers.Qwen2Config(vocab_size=len(tokens), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                      max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(32)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (len(tokens) - 1) + [3])  # 3: control (EOS)
    writer.add_token_merges(["1 2"])
    writer.add_eos_token_id(len(tokens) - 1)
    writer.add_chat_template(TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name not in _GGUF_NAMES:
            _, _, layer, *module, kind = name.split(".")
            _GGUF_NAMES[name] = f"blk.{layer}.{_GGUF_LEAVES['.'.join(module)]}.{kind}"
        writer.add_tensor(_GGUF_NAMES[name], tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-qwen2.gguf"
    return path, write_tiny_qwen2_gguf(path)


def test_a_run_imports_the_gguf_file_once_and_trains_from_it(gguf_file, tmp_path, capsys):
    path, weights = gguf_file
    out = tmp_path / "runs" / "a"
    args = ["stages=[rl]", "algorithm.steps=1", "trainer.num_ranks=1", f"model.model_name_or_path={path}"]
    assert main(["run", str(REPO / "configs" / "tiny.yaml"), f"output_dir={out}", *args]) == 0
    assert "importing" in capsys.readouterr().out
    [imported] = (tmp_path / "runs" / model_import.IMPORTS_DIR).iterdir()
    # The run (every actor) used the imported Hugging Face directory: the resolved config names it.
    saved = load_config(out / "config.yaml")
    assert saved.model.model_name_or_path == str(imported)
    assert json.loads((out / "summary.json").read_text())["steps"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(imported, use_safetensors=True)
    for name, tensor in weights.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert transformers.AutoTokenizer.from_pretrained(imported).chat_template == TEMPLATE
    assert (out / "policy" / "model.safetensors").is_file()

    # A second run beside it reuses the import.
    logged = []
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"output_dir={tmp_path / 'runs' / 'b'}", *args])
    assert model_import.student_from_gguf(cfg, logged.append).model.model_name_or_path == str(imported)
    assert logged == [] and cfg.model.model_name_or_path == str(path)  # the caller's config is left as it was


def test_a_missing_file_or_gguf_package_is_one_line(gguf_file, tmp_path, capsys, monkeypatch):
    config = str(REPO / "configs" / "tiny.yaml")
    assert main(["run", config, f"output_dir={tmp_path / 'run'}", f"model.model_name_or_path={tmp_path}/no.gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no.gguf does not exist" in err and len(err.splitlines()) == 1
    real_find_spec = model_import.importlib.util.find_spec
    monkeypatch.setattr(model_import.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    assert main(["run", config, f"output_dir={tmp_path / 'run'}", f"model.model_name_or_path={gguf_file[0]}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs the gguf package: pip install gguf" in err and len(err.splitlines()) == 1
    assert not (tmp_path / model_import.IMPORTS_DIR).exists() and not (tmp_path / "run").exists()
