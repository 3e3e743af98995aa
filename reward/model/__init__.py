"""The distilled reward model: the network, its losses, preference data and labelling, its DeepSpeed ranks, evaluation."""
