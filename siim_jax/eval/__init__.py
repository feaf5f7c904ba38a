"""Evaluation: k-NN monitor (linear probe, fine-tune and few-shot protocols to come)."""
