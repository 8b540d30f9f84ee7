"""Selector process: down-samples groups of completions (PODS) and computes advantages."""
