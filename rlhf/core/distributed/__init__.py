"""Ray clusters and placement, DeepSpeed ranks inside Ray actors, worker pools that survive deaths, weight sync."""
