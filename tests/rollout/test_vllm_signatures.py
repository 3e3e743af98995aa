"""The stand-in vLLM (tests/fake_vllm.py) and the arguments the vllm engine builds (rollout/vllm_params.py) against
the real vLLM's source: every parameter the engine passes exists there, under the same name, and every method the
engine calls takes the parameters the stand-in takes. Read with ``ast`` from the installed vllm package (never
imported: it needs CUDA), or from an unpacked wheel that ``DISTILRL_VLLM_SRC`` names (the directory holding
``vllm/``); skipped when neither is there."""
from __future__ import annotations

import ast
import importlib.util
import inspect
import os
from pathlib import Path

import pytest

from rlhf.core.config.run_config import RolloutConfig
from rollout import vllm_params
from tests import fake_vllm


def _vllm_source() -> Path | None:
    if os.environ.get("DISTILRL_VLLM_SRC"):
        return Path(os.environ["DISTILRL_VLLM_SRC"]) / "vllm"
    spec = importlib.util.find_spec("vllm")  # locates the package without running it
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


SOURCE = _vllm_source()
pytestmark = pytest.mark.skipif(SOURCE is None or not SOURCE.is_dir(),
                                reason="vllm is not installed and DISTILRL_VLLM_SRC is unset")


def _class(path: str, name: str) -> ast.ClassDef:
    tree = ast.parse((SOURCE / path).read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)


def _params(cls: ast.ClassDef, method: str) -> list[str]:
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == method)
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg != "self"]


def _fields(cls: ast.ClassDef) -> set[str]:
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def _fake_params(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]


def test_the_llm_constructor_takes_every_argument_the_engine_passes(tmp_path):
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 2048}')
    named = set(_params(_class("entrypoints/llm.py", "LLM"), "__init__"))
    engine_args = _fields(_class("engine/arg_utils.py", "EngineArgs"))  # what **kwargs may carry
    rollout = RolloutConfig(engine="vllm", tensor_parallel_size=2).model_copy(update={"weight_transfer": "ipc"})
    passed = vllm_params.llm_kwargs(str(tmp_path), rollout, 0, "ipc")
    assert set(passed) - named - engine_args == set()
    assert set(_fake_params(fake_vllm.LLM.__init__)) <= named


@pytest.mark.parametrize("method", ["generate", "collective_rpc", "reset_prefix_cache", "sleep", "wake_up"])
def test_the_stand_ins_llm_methods_have_vllms_parameters(method):
    assert _fake_params(getattr(fake_vllm.LLM, method)) == _params(_class("entrypoints/llm.py", "LLM"), method)


@pytest.mark.parametrize("method", ["init_weight_transfer_engine", "start_weight_update", "update_weights",
                                    "finish_weight_update"])
def test_the_weight_transfer_calls_have_vllms_parameters(method):
    real = _params(_class("entrypoints/rl/offline.py", "RLOfflineMixin"), method)
    assert _fake_params(getattr(fake_vllm.LLM, method)) == real


def test_sampling_params_has_every_field_the_engine_sets():
    fields = _fields(_class("sampling_params.py", "SamplingParams"))
    kwargs, _ = vllm_params.sampling_kwargs(2, 4, 8, 1.0, False, [1], 0)
    assert set(kwargs[0]) <= fields
    assert set(_fake_params(fake_vllm.SamplingParams.__init__)) <= fields


def test_vllms_limits_are_the_ones_the_engine_enforces():
    text = (SOURCE / "sampling_params.py").read_text()
    assert "temperature must be in [0, 2]" in text and "n must be 1 when using greedy sampling" in text
    assert "seed + index" in (SOURCE / "v1/engine/parallel_sampling.py").read_text()  # child seeds, n apart
