"""1% few-shot protocol (MSN's): per-sample centred, L2-normalised frozen features -> L2-penalised multinomial
logistic regression solved on device with L-BFGS, and the few-shot training subsets (k per class or the ImageNet
1% list).

Objective (cyanure's convention, which MSN's `logistic_eval.py` uses with lambd = 0.1 / n_train for ViT-B):

    F(W, b) = (1/N) sum_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||_F^2      (b not penalised)

scikit-learn's `LogisticRegression(C=...)` minimises 0.5 ||W||^2 + C sum_i CE, i.e. C N times F with
C = 1 / (N l2): the two have the same minimiser.
"""

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls (no TF32 / bf16 passes on GPU / TPU)


def centre_and_normalise_rows(features):
    """features (N, D) -> float32 (N, D): each row minus the mean of its own D values, then divided by its own
    L2 norm (rows of zero norm stay zero). cyanure's `preprocess(X, normalize=True, columns=False,
    centering=True)` as the official `main_logistic.py` calls it: rows are samples and no statistic is shared
    across them, so the training and validation features are processed separately (JAX; sharding kept)."""
    features = jnp.asarray(features, jnp.float32)
    centred = features - jnp.mean(features, axis=1, keepdims=True)
    norm = jnp.linalg.norm(centred, axis=1, keepdims=True)
    return centred / jnp.where(norm > 0, norm, 1.0)


def logistic_objective(params: dict, features, labels, l2):
    """params {"weights": (D, C)[, "bias": (C,)]}, features (N, D), labels (N,) int. Returns the scalar
    mean_i CE(softmax(x_i W + b), y_i) + (l2 / 2) ||W||^2 (the module docstring's F)."""
    logits = jnp.dot(features, params["weights"], precision=_HIGHEST)
    if "bias" in params:
        logits = logits + params["bias"]
    cross_entropy = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.mean(cross_entropy) + 0.5 * l2 * jnp.sum(jnp.square(params["weights"]))


def _solve(features, labels, l2, tol, *, num_classes: int, max_iter: int, fit_intercept: bool, memory_size: int):
    """L-BFGS (optax, zoom line search) in a while_loop. Returns (params, iterations, gradient norm, value)."""
    params = {"weights": jnp.zeros((features.shape[1], num_classes), jnp.float32)}
    if fit_intercept:
        params["bias"] = jnp.zeros((num_classes,), jnp.float32)

    def objective(p):
        return logistic_objective(p, features, labels, l2)

    solver = optax.lbfgs(memory_size=memory_size)
    value_and_grad = optax.value_and_grad_from_state(objective)

    def keep_going(carry):
        _, state, gradient_norm = carry
        count = optax.tree.get(state, "count")
        return (count == 0) | ((count < max_iter) & (gradient_norm >= tol))

    def step(carry):
        params, state, _ = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=objective)
        params = optax.apply_updates(params, updates)
        # The line search stores the value and gradient at the new point, so this norm is that of `params`.
        return params, state, optax.tree.norm(optax.tree.get(state, "grad"))

    carry = (params, solver.init(params), jnp.asarray(jnp.inf, jnp.float32))
    params, state, gradient_norm = jax.lax.while_loop(keep_going, step, carry)
    return params, optax.tree.get(state, "count"), gradient_norm, optax.tree.get(state, "value")


_solve_jit = jax.jit(_solve, static_argnames=("num_classes", "max_iter", "fit_intercept", "memory_size"))


def fit_logistic_regression(features, labels, num_classes: int, l2: float, max_iter: int = 1000, tol: float = 1e-6,
                            fit_intercept: bool = False, memory_size: int = 10, return_info: bool = False):
    """features (N, D) float (may be a JAX array sharded over devices along N; it is not gathered), labels (N,)
    int in [0, num_classes). Minimises F = mean_i CE(softmax(x_i W [+ b]), y_i) + (l2 / 2) ||W||^2 (bias not
    penalised; cyanure's (1/n) sum loss + (lambda/2) ||w||^2, so l2 = lambda, e.g. 0.1 / N for MSN's ViT-B;
    sklearn's C = 1 / (N l2)) by L-BFGS from W = 0, stopping when ||grad F|| < tol or after max_iter iterations.

    Returns weights (D, C) float32, or (weights, bias (C,)) when fit_intercept; with return_info, also a dict
    {"iterations": int, "grad_norm": float, "objective": float} as the last element.
    """
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be (N, D) and labels (N,); got {features.shape} and {labels.shape}")
    params, iterations, gradient_norm, value = _solve_jit(
        features, labels, jnp.float32(l2), jnp.float32(tol), num_classes=int(num_classes), max_iter=int(max_iter),
        fit_intercept=bool(fit_intercept), memory_size=int(memory_size))
    result = (params["weights"], params["bias"]) if fit_intercept else (params["weights"],)
    if return_info:
        result += ({"iterations": int(iterations), "grad_norm": float(gradient_norm), "objective": float(value)},)
    return result[0] if len(result) == 1 else result


def predict(weights, features, bias=None):
    """weights (D, C), features (N, D)[, bias (C,)]. Returns (N,) int32 class indices (argmax of the logits)."""
    logits = jnp.dot(jnp.asarray(features, jnp.float32), weights, precision=_HIGHEST)
    if bias is not None:
        logits = logits + bias
    return jnp.argmax(logits, axis=1).astype(jnp.int32)


def top1(weights, features, labels, bias=None) -> float:
    """weights (D, C), features (N, D), labels (N,) int[, bias (C,)]. Returns top-1 accuracy in [0, 1]."""
    return float(jnp.mean(predict(weights, features, bias) == jnp.asarray(labels)))


def few_shot_subset(labels, *, per_class: int | None = None, index_file: str | None = None,
                    names: Sequence[str] | None = None, seed: int = 0) -> np.ndarray:
    """Indices (sorted, int64) into a training source of N images with labels (N,) int, chosen by exactly one of:

    - per_class=k: k images per class, drawn without replacement by a NumPy generator seeded with `seed`
      (the same seed gives the same subset); a class with fewer than k images gives all it has.
    - index_file: the ImageNet 1% list format (SimCLR's / MSN's `1percent.txt`): one image file name per line,
      e.g. `n01440764_10026.JPEG`, matched against the base names of `names` (the source's N file names or
      relative paths). A listed name missing from `names` is an error naming the first few and the count.
    """
    labels = np.asarray(labels)
    if (per_class is None) == (index_file is None):
        raise ValueError("few_shot_subset needs exactly one of per_class and index_file")
    if per_class is not None:
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        rng = np.random.default_rng(seed)
        chosen = []
        for label in np.unique(labels):
            members = np.flatnonzero(labels == label)
            chosen.append(rng.choice(members, size=min(per_class, members.size), replace=False))
        return np.sort(np.concatenate(chosen)).astype(np.int64)

    if names is None:
        raise ValueError("few_shot_subset(index_file=...) needs names, the training source's file names")
    if len(names) != labels.shape[0]:
        raise ValueError(f"{len(names)} names for {labels.shape[0]} labels")
    position = {}
    for i, name in enumerate(names):
        base = os.path.basename(str(name))
        if base in position:
            raise ValueError(f"file name {base!r} occurs more than once in names (indices {position[base]}, {i})")
        position[base] = i
    from siim_jax import storage
    listed = [line.strip() for line in storage.read_text(index_file).splitlines() if line.strip()]
    unknown = [name for name in listed if os.path.basename(name) not in position]
    if unknown:
        raise ValueError(f"{len(unknown)} of the {len(listed)} names in {index_file} are not in the training source, "
                         f"e.g. {unknown[:5]}")
    return np.unique(np.array([position[os.path.basename(name)] for name in listed], np.int64))
