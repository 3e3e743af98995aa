"""The tool sandbox, tool-call parsing and the tool environments: whatever a model writes, a turn's answer is an
observation, never an exception, and a tool that hangs, crashes or floods costs no more than its limits."""
from __future__ import annotations

import time

import pytest

from rlhf.core.config.rl_config import MultiTurnConfig
from rlhf.core.config.teacher_config import WarmupConfig
from rlhf.core.models.build import build_tokenizer
from rlhf.stages.warmup import sft_batch, teacher_examples
from rollout.environments import ENVIRONMENTS
from rollout.environments.confine import landlock_abi
from rollout.environments.sandbox import SandboxLimits, run_python
from rollout.environments.tools import CALCULATOR, PYTHON, parse_calls

LIMITS = SandboxLimits(seconds=1.0, memory_mb=128, output_bytes=300)
TOOLS = {"calculator": CALCULATOR, "python": PYTHON}


def _python_env(**limits):
    return ENVIRONMENTS["tools"](MultiTurnConfig(tool_seconds=1.0, tool_memory_mb=128, tool_output_bytes=300,
                                                 **limits))


def _plain(code: str) -> str:
    return f'<tool_call>{{"name": "python", "arguments": {{"code": "{code}"}}}}</tool_call>'


@pytest.mark.parametrize("code, says", [
    ("while True: pass", "ran past its 1 s limit"),              # spins on the CPU
    ("import time; time.sleep(30)", "ran past its 1 s limit"),  # sleeps: only the wall clock catches it
    ("import os; os.abort()", "crashed (SIGABRT)"),
    ("1/0", "ZeroDivisionError"),
    ("x = bytearray(2**30)", "MemoryError"),
    ("while True: print(12345678)", "more than 300 bytes"),
])
def test_a_hanging_crashing_or_flooding_tool_is_an_error_observation_within_its_limits(code, says):
    env = _python_env()
    start = time.perf_counter()
    result = env.step(_plain(code))
    assert time.perf_counter() - start < 1.0 + 2.0  # the limit, plus a busy box's process start and clean-up
    assert not result.done and result.info["tool_errors"] == 1 and result.info["tool_calls"] == 1
    assert says in result.observation and result.observation.startswith("\n<|im_start|>user\n<tool_response>")
    assert len(result.observation) < 300  # a flood never reaches the context


def test_a_tool_cannot_reach_the_network_or_write_outside_its_directory(tmp_path):
    refused = run_python("import socket; socket.create_connection(('127.0.0.1', 9))", LIMITS)
    assert not refused.ok and "network" in refused.output
    inside = run_python("open('scratch.txt', 'w').write('ok'); print(open('scratch.txt').read())", LIMITS)
    assert inside.ok and inside.output == "ok"
    if not landlock_abi():
        pytest.skip("this kernel has no Landlock: writes outside the directory are not refused here")
    target = tmp_path / "escaped.txt"
    outside = run_python(f"open({str(target)!r}, 'w').write('x')", LIMITS)
    assert not outside.ok and "PermissionError" in outside.output and not target.exists()


@pytest.mark.parametrize("turn, says", [
    ('<tool_call>{"name": "calculator", "arguments": {"expression": "7+5"</tool_call>', "not valid JSON"),
    ('<tool_call>["calculator"]</tool_call>', '{"name": ..., "arguments": {...}}'),
    ('<tool_call>{"name": "shell", "arguments": {}}</tool_call>', "unknown tool 'shell'"),
    ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>', "missing ['expression']"),
    ('<tool_call>{"name": "calculator", "arguments": {"expression": 7}}</tool_call>', "must be a string"),
    ("<call>calculator import os</call>", "the calculator takes numbers"),
])
def test_a_bad_tool_call_is_an_observation_not_an_exception(turn, says):
    result = _python_env().step(turn)
    assert not result.done and result.info == {"tool_calls": 1, "tool_errors": 1, "tool_s": 0.0, "turn_reward": 0.0}
    assert says in result.observation


def test_failed_calls_are_shaped_per_turn_when_asked():
    """rollout.multi_turn.tool_error_reward: each failed call of a turn adds it to the turn's reward."""
    from rlhf.core.algorithms.shaping import turn_rewards

    env = _python_env(tool_error_reward=-0.25)
    bad = '<tool_call>{"name": "shell", "arguments": {}}</tool_call>'
    assert env.step(bad + bad).info["turn_reward"] == -0.5
    assert env.step(_plain("print(2)")).info["turn_reward"] == 0.0
    assert env.step("#4").info["turn_reward"] == 0.0
    # summed per trajectory (rollout/multi_turn.py), then added to the rewards (RLStep._shaped)
    assert turn_rewards([{"turn_reward": -0.75}, None, {"turns": 1}]).tolist() == [-0.75, 0.0, 0.0]
    assert turn_rewards([{"turn_reward": 0.0}, None]) is None


def test_calls_are_read_in_both_formats_and_answered_in_the_callers_format():
    calls = parse_calls('think <call>calculator 7+5-3</call> then <tool_call>{"name": "python", "arguments": '
                        '"{\\"code\\": \\"print(2)\\"}"}</tool_call>', TOOLS)
    assert [(c.name, c.arguments, c.plain, c.error) for c in calls] == [
        ("calculator", {"expression": "7+5-3"}, True, None), ("python", {"code": "print(2)"}, False, None)]
    env = ENVIRONMENTS["calculator"](MultiTurnConfig())
    assert env.step("<call>calculator 7+5-3</call>").observation == "<result>9</result>"
    assert env.step("<call>calculator 12/4</call>").observation == "<result>3</result>"
    qwen = env.step('<tool_call>\n{"name": "calculator", "arguments": {"expression": "(2+3)*4"}}\n</tool_call>')
    assert qwen.observation == ("\n<|im_start|>user\n<tool_response>\n20\n</tool_response><|im_end|>\n"
                                "<|im_start|>assistant\n")
    final = env.step("#9")
    assert final.done and final.observation == "" and final.info["tool_calls"] == 0


def test_the_calculator_environment_demonstrates_its_own_format():
    env = ENVIRONMENTS["calculator"](MultiTurnConfig())
    segments = env.demonstration("7+5-3", 9)
    assert [trained for _, trained in segments] == [True, False, True]
    assert env.step(segments[0][0]).observation == segments[1][0]  # warm-up shows what RL will see
    assert env.step(segments[2][0]).done


def test_every_registered_environment_answers_a_plain_turn():
    for name in ENVIRONMENTS:
        env = ENVIRONMENTS[name](MultiTurnConfig())
        assert env.reset("2+2=") == "2+2="
        assert env.step("#4").done


def test_schemas_are_openai_tool_entries():
    entry = CALCULATOR.schema()
    assert entry["type"] == "function" and entry["function"]["name"] == "calculator"
    assert entry["function"]["parameters"]["required"] == ["expression"]


def test_warmup_tool_traces_train_the_model_turns_only():
    tokenizer = build_tokenizer("char")
    pairs = teacher_examples(WarmupConfig(tool_fraction=0.5, terse_fraction=0.5), seed=0)(200)
    traces = [response for _, response in pairs if not isinstance(response, str)]
    assert 70 < len(traces) < 130  # about half call the calculator
    prompt, trace = next((p, r) for p, r in pairs if not isinstance(r, str))
    batch = sft_batch(tokenizer, [(prompt, trace), ("1+2=", "#3")])
    eos = tokenizer.eos_token_id
    call, observation, answer = (tokenizer(text, add_special_tokens=False).input_ids for text, _ in trace)
    start = len(tokenizer(prompt, add_special_tokens=False).input_ids)
    expected = call + [eos] + [-100] * len(observation) + answer + [eos]
    assert batch["labels"][0, start:start + len(expected)].tolist() == expected
    assert batch["labels"][1].ne(-100).sum() == len("#3") + 1


def test_an_unknown_environment_is_refused_at_start_naming_the_key():
    from rlhf.core.config.run_config import ConfigError, RunConfig
    from rlhf.registered import check_registered

    check_registered(RunConfig.model_validate({"rollout": {"environment": "calculator"}}))
    with pytest.raises(ConfigError, match="rollout.environment: unknown environment 'shell'"):
        check_registered(RunConfig.model_validate({"rollout": {"environment": "shell"}}))
