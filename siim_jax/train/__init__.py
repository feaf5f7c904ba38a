"""Train state, schedules, the jitted step, checkpoints and the training loop."""
