"""P²O's additions to GRPO on the learner side: evolved templates in prompts and context distillation."""
