"""Multi-turn environments behind one registry (``rollout.environment``): rollout/environments/base.py says what one
is; tool_env.py holds the built-in tool-calling ones, tools.py the tools and call parsing, sandbox.py and
confine.py the limits a tool runs under. A new environment is one class plus one ``ENVIRONMENTS.register`` line."""
from rollout.environments.base import ENVIRONMENTS, Environment, StepResult
from rollout.environments import tool_env  # noqa: F401 - registers tools and calculator

__all__ = ["ENVIRONMENTS", "Environment", "StepResult"]
