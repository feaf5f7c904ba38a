"""Encoder sizes by variant name (config.model.variant): (width, depth, heads, patch size)."""

VIT_VARIANTS = {
    "mu": (64, 2, 2, 8),  # test-sized
    "Ti": (192, 12, 3, 16),
    "S": (384, 12, 6, 16),
    "B": (768, 12, 12, 16),
    "L": (1024, 24, 16, 16),
    "H": (1280, 32, 16, 14),
}
