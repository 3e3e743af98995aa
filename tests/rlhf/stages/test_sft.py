"""Distillation SFT on a traces dataset (rlhf/stages/sft.py): response-only loss masks checked token by token, packed and
padded losses against a hand-computed one, a ``messages`` dataset through SFT (and the student saved in plain
Hugging Face format) and through RL prompts, and the warm-up's refusal to fall back to arithmetic silently."""
from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf.core.models.char_tokenizer import build_char_tokenizer
from rlhf.core.config.run_config import ConfigError, ModelConfig, RunConfig, TaskConfig, load_config
from rlhf.core.data.datasets import load_rows
from rlhf.core.models.build import build_student
from rlhf.cli import main
from rlhf.stages.sft import collate, response_loss, run_sft, tokenize_conversation, traces_path

# A chat template written in the char tokenizer's alphabet: <role>content; per turn.
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }};{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   max_position_embeddings=256)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="},
        {"role": "assistant", "content": "<think>1+2=3</think>#3"}, {"role": "user", "content": "2+5="},
        {"role": "assistant", "content": "#7"}]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def test_plain_text_masks_exactly_the_replies_and_their_end_of_sequence(tok):
    ids, mask = tokenize_conversation(CHAT, tok, TaskConfig())
    eos = tok.eos_token_id
    pieces = [(_ids(tok, "be brief\n\n1+2="), 0), (_ids(tok, "<think>1+2=3</think>#3") + [eos], 1),
              (_ids(tok, "\n\n2+5="), 0), (_ids(tok, "#7") + [eos], 1)]
    assert ids == [i for piece, _ in pieces for i in piece]
    assert mask == [m for piece, m in pieces for _ in piece]


def test_a_chat_template_masks_each_assistant_turn_with_its_end_mark_and_keeps_think_blocks(tok):
    task = TaskConfig(chat_template=TEMPLATE)
    ids, mask = tokenize_conversation(CHAT, tok, task)
    assert tok.decode(ids) == "<system>be brief;<user>1+2=;<assistant><think>1+2=3</think>#3;<user>2+5=;<assistant>#7;"
    trained = "".join(tok.decode([i]) if m else "_" for i, m in zip(ids, mask))
    assert trained == "_" * len("<system>be brief;<user>1+2=;<assistant>") + "<think>1+2=3</think>#3;" + \
        "_" * len("<user>2+5=;<assistant>") + "#7;"


def test_packed_and_padded_losses_equal_the_hand_computed_response_loss(tok):
    model = build_student(TINY, tok, seed=0).eval()
    convs = [CHAT, CHAT[:3], [{"role": "user", "content": "9-1="}, {"role": "assistant", "content": "#8"}]]
    examples = [tokenize_conversation(c, tok, TaskConfig()) for c in convs]
    batch = collate(examples, tok.pad_token_id)
    expected, count = 0.0, 0
    for ids, mask in examples:
        logits = model(torch.tensor([ids])).logits[0].double()
        for t in range(1, len(ids)):
            if mask[t]:
                expected -= torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
                count += 1
    with torch.no_grad():
        packed, n_packed = response_loss(model, batch, pack=True)
        padded, n_padded = response_loss(model, batch, pack=False)
    assert n_packed == n_padded == count == sum(sum(m) for _, m in examples)
    assert packed.item() == pytest.approx(expected, rel=1e-4) and padded.item() == pytest.approx(expected, rel=1e-4)


def _messages_dataset(tmp_path, n=48):
    rows = [{"messages": [{"role": "system", "content": "add"}, {"role": "user", "content": f"{a}+{b}="},
                          {"role": "assistant", "content": f"<think>{a}+{b}={a + b}</think>#{a + b}"}]}
            for a in range(1, 9) for b in range(1, 7)][:n]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "traces"))
    return str(tmp_path / "traces")


def test_a_messages_dataset_trains_the_student_which_saves_in_plain_transformers_format(tmp_path, tok):
    import rlhf

    path = _messages_dataset(tmp_path)
    cfg = RunConfig(output_dir=str(tmp_path / "run"), stages=["sft"], model=TINY.model_dump(),
                    warmup={"traces_file": path, "steps": 30, "batch_size": 8, "lr": 0.01, "eval_fraction": 0.25})
    model = build_student(cfg.model, tok, seed=0)
    figures = run_sft(model, tok, cfg, path, log=lambda line: None)
    assert (figures["train_examples"], figures["eval_examples"], figures["steps"]) == (36, 12, 30)
    assert figures["eval_loss"] < 2.0 < 4.0 < figures["eval_loss_before"]  # about ln(80) = 4.4 at the start
    with rlhf.Trainer(cfg, log=lambda line: None) as trainer:
        summary = trainer.warmup()
    student = AutoModelForCausalLM.from_pretrained(summary["student_dir"])
    assert student.config.hidden_size == 32 and summary["eval_loss"] < 2.5
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warmup"]["steps"] == 30


def test_messages_prompts_answer_the_last_user_turn_with_earlier_turns_as_context(tmp_path, tok):
    lines = [{"messages": CHAT[:4] + [{"role": "assistant", "content": "#7"}], "answer": "7"},
             {"messages": [{"role": "user", "content": "3+3="}], "answer": "6"},
             {"messages": [{"role": "assistant", "content": "hi"}], "answer": "1"},
             {"messages": [{"role": "user", "content": None}], "answer": "2"}]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    task = TaskConfig(name="dataset", train_file=str(path), eval_file=str(path), prompt_field="messages",
                      chat_template=TEMPLATE, shuffle=False)
    logged = []
    train, _ = load_rows(task, 0, tokenizer=tok, log=logged.append)
    assert [r.prompt for r in train] == [
        "<system>be brief;<user>1+2=;<assistant><think>1+2=3</think>#3;<user>2+5=;<assistant>", "<user>3+3=;<assistant>"]
    assert [r.answer for r in train] == ["7", "6"]
    assert "no user turn" in logged[0] and "must have text content" in logged[0]
    raw, _ = load_rows(task, 0, log=None)  # unrendered, as the traces stage reads them: the conversation kept
    assert raw[0].prompt == "2+5=" and len(raw[0].messages) == 4


def test_warmup_on_another_task_without_traces_is_refused_in_one_line(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "answer": "1"}\n')
    keys = [f"output_dir={tmp_path / 'run'}", "task.name=dataset", f"task.train_file={data}",
            f"task.eval_file={data}", "stages=[warmup,rl,eval]"]
    with pytest.raises(ConfigError, match="warmup.traces_file"):
        load_config(None, keys)
    assert main(["run", "configs/tiny.yaml", *keys]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs a traces dataset" in err and not (tmp_path / "run").exists()
    assert main(["sft", "configs/tiny.yaml", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "needs a traces dataset" in capsys.readouterr().err
    # Prompts passed in from Python to an arithmetic config: the arithmetic warm-up, said out loud.
    said = []
    assert traces_path(RunConfig(), tmp_path, custom_prompts=True, log=said.append) is None
    assert "warmup.traces_file" in said[0]
    with pytest.raises(ConfigError, match="task dataset needs a traces dataset"):
        traces_path(RunConfig.model_construct(stages=["warmup"], warmup=RunConfig().warmup,
                                              task=TaskConfig.model_construct(name="dataset")), tmp_path)


def test_run_with_traces_and_sft_stages_distils_the_oracle_into_the_student(tmp_path):
    import rlhf

    cfg = RunConfig(output_dir=str(tmp_path / "run"), stages=["traces", "sft", "eval"], model=TINY.model_dump(),
                    traces={"teacher": "oracle", "prompts": 30, "samples_per_prompt": 3, "chars_per_rv": 6.0,
                            "keep": 0.5},
                    warmup={"steps": 6, "batch_size": 8, "eval_fraction": 0.2},
                    task={"eval_prompts": 4}, eval={"max_new_tokens": 6})
    said = []
    result = rlhf.run(cfg, log=said.append)
    # No RL stage: no RL batch figures, one evaluation (not "before/after RL"), the SFT loss curve in the report.
    assert not [line for line in said if "RL step" in line or "eval before" in line or "eval after" in line]
    assert [line for line in said if line.startswith("eval: accuracy")]
    assert "eval_before" not in result.summary and result.summary["eval_after"]["n"] == 4
    report = (tmp_path / "run" / "report.md").read_text()
    assert "(plots/sft.png)" in report and "final policy (no RL stage)" in report
    traces, warmup = result.summary["traces"], result.summary["warmup"]
    assert traces["written"] == 90 and 0 < traces["kept"] < 90
    assert warmup["train_examples"] + warmup["eval_examples"] == traces["kept"] and warmup["steps"] == 6
    assert warmup["eval_loss"] < warmup["eval_loss_before"]
    assert AutoModelForCausalLM.from_pretrained(warmup["student_dir"]).config.hidden_size == 32
