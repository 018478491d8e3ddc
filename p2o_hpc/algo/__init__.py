"""Advantage estimators, policy losses and loss aggregation, by name."""
