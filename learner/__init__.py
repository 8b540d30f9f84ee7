"""The learner: a torch.distributed trainer over groups of (possibly stale) completions."""
