"""Evaluation: the evaluators the trainer schedules (k-NN monitor, validation top-1/top-5), the on-device k-NN,
the few-shot logistic-regression solver, --pretrained loading, and the linear-probe / fine-tune command."""
