"""Data: built-in images, two-view sampling, block masks, photometric augmentation and batching."""
