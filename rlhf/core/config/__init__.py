"""The run config: one tree of validated sections (run_config), the trainer's knobs (training_config), registries."""
