"""The RL step and everything it drives: the update, the policy and critic ranks, the driver-side actor groups, prefetching, evaluation."""
