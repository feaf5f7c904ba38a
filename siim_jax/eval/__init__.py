"""Evaluation: the evaluators the trainer schedules (k-NN monitor, validation top-1/top-5), the on-device k-NN,
the few-shot logistic-regression solver and protocol, --pretrained loading, and the linear-probe / fine-tune
command."""
