"""Tool-calling environments: the model's turn may call tools; their results are the next observation.

A turn without a call is the final answer and ends the episode. Calls are read in Qwen2.5's ``<tool_call>`` JSON
format or the plain ``<call>name argument</call>`` format (rollout/environments/tools.py), and answered in the
same format: a ChatML tool message for the first, ``<result>...</result>`` for the second. A call that cannot be
read or run (bad JSON, unknown tool, a tool that hangs, crashes or floods) is answered with its error line.
"""
from __future__ import annotations

from rollout.environments.base import ENVIRONMENTS, Environment, StepResult
from rollout.environments.sandbox import SandboxLimits, ToolResult
from rollout.environments.tools import CALCULATOR, PYTHON, Tool, ToolCall, parse_calls

# The tool message Qwen2.5's chat template writes, after the assistant's turn ended with <|im_end|>.
_CHATML_RESULT = "\n<|im_start|>user\n<tool_response>\n{}\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
_PLAIN_RESULT = "<result>{}</result>"
MAX_CALLS_PER_TURN = 4


class ToolEnvironment(Environment):
    """``tools``: the tools the model may call (by default the calculator and the Python sandbox)."""

    tools: tuple[Tool, ...] = (CALCULATOR, PYTHON)

    def __init__(self, limits=None):
        super().__init__(limits)
        self.by_name = {tool.name: tool for tool in self.tools}
        self.error_reward = limits.tool_error_reward if limits is not None else 0.0  # per failed call
        self.sandbox = SandboxLimits(limits.tool_seconds, limits.tool_memory_mb, limits.tool_output_bytes) \
            if limits is not None else SandboxLimits()

    def step(self, turn: str) -> StepResult:
        calls = parse_calls(turn, self.by_name)
        if not calls:
            return StepResult("", True, {"tool_calls": 0, "tool_errors": 0, "tool_s": 0.0, "turn_reward": 0.0})
        results = [self._run(call) for call in calls[:MAX_CALLS_PER_TURN]]
        if len(calls) > MAX_CALLS_PER_TURN:
            results.append(ToolResult(False, f"error: at most {MAX_CALLS_PER_TURN} calls per turn", 0.0))
        template = _PLAIN_RESULT if calls[0].plain else _CHATML_RESULT
        observation = "".join(template.format(r.output) for r in results)
        errors = sum(not r.ok for r in results)
        info = {"tool_calls": len(calls), "tool_errors": errors, "tool_s": sum(r.seconds for r in results),
                "turn_reward": self.error_reward * errors}
        return StepResult(observation, False, info)

    def _run(self, call: ToolCall) -> ToolResult:
        if call.error is not None:
            return ToolResult(False, f"error: {call.error}", 0.0)
        return self.by_name[call.name].fn(self.sandbox, **call.arguments)


class CalculatorEnvironment(ToolEnvironment):
    """The arithmetic task with a calculator: the model may hand the chain to the calculator before answering
    with ``#N`` (the task's verifier reads the final turn)."""

    tools = (CALCULATOR,)

    @staticmethod
    def demonstration(expression: str, answer: int) -> list[tuple[str, bool]]:
        """A worked tool-using answer as (text, model turn?) segments, each model turn ended by end-of-sequence:
        what warm-up distillation shows the student (the observation is this environment's own format)."""
        return [(f"<call>{CALCULATOR.name} {expression}</call>", True), (_PLAIN_RESULT.format(answer), False),
                (f"#{answer}", True)]


ENVIRONMENTS.register("tools", ToolEnvironment)
ENVIRONMENTS.register("calculator", CalculatorEnvironment)
