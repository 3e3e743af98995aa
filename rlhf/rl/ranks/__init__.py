"""DeepSpeed ranks that run inside Ray actors: the policy and the critic."""
