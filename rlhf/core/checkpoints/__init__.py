"""Atomic writes of run artefacts, and the resumable state of a run."""
