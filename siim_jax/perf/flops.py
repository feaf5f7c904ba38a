"""Analytic FLOPs of one training image (matrix products only, 2 FLOPs per multiply-add), the MFU numerator.

A train step costs 3x the forward FLOPs of every part that is differentiated (forward + backward for inputs and
weights) and 1x for the target branch, which is run without gradients. Norms, softmax, the loss and the
optimiser are left out (< 1%), as MFU conventionally does. ViT-B/16 SiameseIM at 224 px: 141.5 GFLOP/image;
L/16: 334; H/14: 816 (XLA's own count of the compiled step: 143, 337, 823). Per-block counts:
siim_jax/models/flops.py.
"""


def train_flops_per_image(method) -> float:
    """Analytic FLOPs of one image of a train step of `method` (siim_jax/methods): 3 x the forward of the
    differentiated parts (forward, backward for inputs and weights) + 1 x the forward-only parts (a target
    branch, a frozen encoder)."""
    parts = method.forward_flops()
    return 3 * parts["differentiated"] + parts.get("forward_only", 0.0)
