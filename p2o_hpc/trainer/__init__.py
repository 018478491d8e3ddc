"""The RL loop: rollouts → rewards → advantages → loss → update, with mining, metrics and resumable state."""
