"""Rollout servers: sample groups with an engine, score them with a task's verifier, push them."""
