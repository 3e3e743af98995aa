"""Custom reward functions named in the config (``reward.custom_fn``): ``module.path:function`` or
``path/to/file.py:function``, loaded in the driver and shipped to the reward workers by value.

The function is called as ``fn(prompts, responses, rows)`` on a batch and returns one float per response; a
coroutine function (``async def``) is awaited, so a reward that calls a remote judge can fan out its requests.
"""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable

from rlhf.core.config.run_config import ConfigError


def load_reward_fn(spec: str, key: str = "reward.custom_fn") -> Callable:
    """The function ``spec`` names; a ``ConfigError`` naming ``key`` when the module or function is not there."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"config key {key}: {spec!r} must read module.path:function or path/to/file.py:function")
    if target.endswith(".py"):
        module = _module_from_file(Path(target), key)
    else:
        # As `python -m` would: modules in the working directory import without installing them.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001 - any import failure is the user's module: one line, named
            raise ConfigError(f"config key {key}: cannot import {target} ({type(err).__name__}: {err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"config key {key}: {target} has no function {name!r}")
    # Ship the function's code to the Ray workers rather than a reference they could not import (a file path,
    # or a module found through the driver's working directory).
    from ray import cloudpickle  # the copy Ray pickles remote arguments with

    cloudpickle.register_pickle_by_value(module)
    return fn


def _module_from_file(path: Path, key: str):
    if not path.is_file():
        raise ConfigError(f"config key {key}: reward function file {path} does not exist")
    name = f"distilrl_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - the user's file failed to run: one line, named
        del sys.modules[name]
        raise ConfigError(f"config key {key}: {path} failed to load ({type(err).__name__}: {err})") from None
    return module


def call_reward_fn(fn: Callable, prompts: list[str], responses: list[str], rows: list[dict]) -> list:
    """``fn``'s rewards for one batch, awaiting them when ``fn`` is a coroutine function (or returns an awaitable)."""
    result = fn(prompts, responses, rows)
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return list(result)


async def _awaited(awaitable):
    return await awaitable
