"""Rollout generation with vLLM (policy samples for P²O training and evaluation)."""
