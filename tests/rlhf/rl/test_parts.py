"""The RL step's parts offer what rlhf/rl/parts.py says the step asks of them."""
import pytest

from reward.teachers.oracle import OracleTeacher
from rlhf.rl import parts
from rlhf.rl.groups.reward import RewardGroup
from rlhf.rl.groups.rollout import RolloutGroup
from rlhf.rl.update import PolicyUpdate


def _members(protocol) -> set[str]:
    declared = {name for name in vars(protocol) if not name.startswith("_")}
    return declared | set(getattr(protocol, "__annotations__", {}))


@pytest.mark.parametrize("protocol, implementation", [(parts.Rollout, RolloutGroup), (parts.Reward, RewardGroup),
                                                      (parts.Update, PolicyUpdate), (parts.Auditor, OracleTeacher)])
def test_each_part_offers_every_member_of_its_protocol(protocol, implementation):
    annotations = set(getattr(implementation, "__annotations__", {}))
    missing = [m for m in _members(protocol) if not hasattr(implementation, m) and m not in annotations
               and m not in _assigned_in_init(implementation)]
    assert not missing, f"{implementation.__name__} lacks {missing} of {protocol.__name__}"


def _assigned_in_init(cls) -> set[str]:
    """Attributes ``__init__`` sets (``self.x = ...``): instance attributes a class does not show."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Attribute)} | {t.attr for node in ast.walk(tree) if isinstance(node, ast.Assign)
                                                for tup in node.targets if isinstance(tup, ast.Tuple)
                                                for t in tup.elts if isinstance(t, ast.Attribute)}


def test_rows_split_into_contiguous_equal_as_possible_slices():
    from rlhf.core.distributed.split import row_slices, shards

    assert row_slices(7, 3) == [slice(0, 3), slice(3, 5), slice(5, 7)]
    assert shards(list("abcde"), 2) == [["a", "b", "c"], ["d", "e"]]
    assert shards([1], 3) == [[1], [], []]


def test_samples_from_several_workers_count_prompts_over_the_whole_call():
    from rlhf.core.data.samples import Sample
    from rlhf.rl.groups.rollout import in_prompt_order

    def sample(i):
        return Sample(i, [1], [2], [-0.5], "stop", "x")

    # worker 0 had prompts 0-1 (two samples each), worker 1 had prompt 2: each counted from 0 in its own shard
    merged = in_prompt_order([(2, [sample(0), sample(0), sample(1), sample(1)]), (1, [sample(0), sample(0)])])
    assert [s.prompt_index for s in merged] == [0, 0, 1, 1, 2, 2]
