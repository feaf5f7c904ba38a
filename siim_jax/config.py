"""The full set of config keys with the official ViT-B/16 SiameseIM values, and its validation.

The ground floor of the package: it imports nothing of siim_jax. What only a method knows (its name, the
encoder variant, patches and masks) is checked when the method is built (siim_jax/methods).

Recipes in `configs/` start from `base_config()` and override what differs; every key that any recipe or
`--config.key=value` override may set exists here, so a misspelt key fails loudly (the config is locked).
"""

import ml_collections

DEFAULT_LOGICAL_AXIS_RULES = (
    # (logical axis, mesh axes); pure FSDP on the embedding axis, tensor parallelism on MLP/heads.
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""


def base_config() -> ml_collections.ConfigDict:
    """Official SiameseIM ViT-B/16, 1600 epochs, global batch 4096 (SPEC sections 1-4)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 4096  # global, per optimiser step (accumulated micro-batches included)
    c.grad_accum_steps = 1
    c.epochs = 1600
    c.warmup_epochs = 40
    c.total_steps = 0  # > 0: overrides the epoch-based length
    c.warmup_steps = -1  # >= 0: overrides warmup_epochs
    c.log_every_steps = 50
    c.checkpoint_every_steps = 1000
    c.eval_every_steps = 5000  # how often the evaluators below run; 0 disables them
    # evaluators the trainer runs (siim_jax/train/evaluators.py): "knn" (k-NN monitor on encoder features),
    # "validation" (top-1 / top-5 of a classifier on the validation split)
    c.evals = ("knn",)
    c.keep_checkpoints = 3
    # the longest a checkpoint's background write may take before the run ends with one error line (exit 1;
    # the relaunch resumes from the newest intact step): an object store that stopped answering is otherwise
    # retried by TensorStore for tens of minutes. 600 s: a ViT-H state with its EMA and Adam moments (~10 GB)
    # written at 100 MB/s from a single host takes ~100 s
    c.checkpoint_timeout_seconds = 600
    # multi-process runs: how often the processes vote on a stop request (one tiny all-reduce; one process votes
    # every step); every process stops after the same step either way, at most 3x this many steps after the
    # signal. 4: on 2 CPU processes a vote costs ~5 ms a step (138 vs 145 img/s with votes every 1 / 10 steps,
    # tiny demo), while 12 steps stay well inside the ~30 s notice of a spot preemption for ViT-B/L steps
    c.stop_vote_every_steps = 4
    # JAX's persistent compilation cache, so that a restart (preemption, requeue) loads the compiled step:
    # "workdir" = <workdir>/jax_cache, a path (also gs://), or "" for none; $JAX_COMPILATION_CACHE_DIR wins
    c.compilation_cache_dir = "workdir"

    c.model = ml_collections.ConfigDict()
    c.model.loss_type = "siamese"  # the method (siim_jax/methods): siamese, mae, linear_probe or finetune
    c.model.variant = "B"  # key of VIT_VARIANTS (siim_jax/models/variants.py)
    c.model.image_size = 224
    c.model.decoder_width = 768
    c.model.decoder_heads = 16
    c.model.projector_depth = 2
    c.model.predictor_depth = 4
    c.model.mlp_ratio = 4.0
    c.model.use_proj_ln = False  # LayerNorm instead of BatchNorm in projector blocks
    c.model.use_pred_ln = False  # LayerNorm instead of BatchNorm in predictor blocks
    c.model.online_ln = False  # frozen non-affine LayerNorm on the predictions
    c.model.train_patch_embed = False
    c.model.init_values = 0.0  # layer scale; 0 = off
    c.model.dtype = "bfloat16"  # compute dtype; parameters and optimiser state stay float32
    c.model.remat = "none"  # per transformer block: none | dots (recompute all but weight matmuls) | full
    # MAE baseline (loss_type="mae"), SPEC section 3.
    c.model.mae_mask_ratio = 0.75
    c.model.mae_decoder_width = 512
    c.model.mae_decoder_depth = 8
    c.model.mae_decoder_heads = 16
    c.model.norm_pix_loss = True

    # the classifier of the linear probe / fine-tune methods (SPEC section 5); --pretrained gives its encoder
    c.classifier = ml_collections.ConfigDict()
    c.classifier.num_classes = 1000
    c.classifier.encoder = "online"  # which pretrained encoder: online (as the official code) or target (EMA)
    c.classifier.lars_momentum = 0.9  # linear probe: LARS
    c.classifier.trust_coefficient = 0.001
    c.classifier.layer_decay = 0.65  # fine-tune: lr scale 0.65^(depth + 1 - layer id)
    c.classifier.drop_path = 0.1
    c.classifier.mixup = 0.8  # Beta(alpha, alpha); 0 = off
    c.classifier.cutmix = 1.0
    c.classifier.mixup_switch_prob = 0.5  # per batch: cutmix with this probability, else mixup
    c.classifier.label_smoothing = 0.1
    c.classifier.randaugment_ops = 2  # RandAugment rand-m9-mstd0.5-inc1; 0 ops = off
    c.classifier.randaugment_magnitude = 9.0
    c.classifier.randaugment_magnitude_std = 0.5
    c.classifier.erase_prob = 0.25  # random erasing, one box per image
    c.classifier.eval_batch_size = 256
    # train crop sampler: torchvision (ten tries, then a centre crop: fine-tune) or single_draw (the official linear
    # probe's util/crop.py: one draw of area and log-ratio, sides clamped to the image)
    c.classifier.train_crop = "torchvision"

    # the 1% few-shot protocol (MSN's): logistic regression on frozen class-token features
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.l2 = 0.1  # lambda; the penalty is lambda / n_train
    c.fewshot.per_class = 0  # > 0: this many training images per class (seeded), instead of subset_file
    c.fewshot.subset_file = ""  # ImageNet 1% list (one training file name per line)
    c.fewshot.feature = "class_token"  # class_token (MSN's: last block, no norm) or mean_patch (mean patch token)
    c.fewshot.max_iter = 1000
    c.fewshot.batch_size = 256  # feature extraction

    c.loss = ml_collections.ConfigDict()
    c.loss.neg_weight = 0.02

    c.optim = ml_collections.ConfigDict()
    c.optim.blr = 6.25e-5  # lr = blr * batch_size / 256
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.optim.clip_norm = 1.0  # global norm; 0 disables clipping

    c.ema = ml_collections.ConfigDict()
    c.ema.base_momentum = 0.995

    c.data = ml_collections.ConfigDict()
    c.data.source = "builtin"  # or "imagefolder:<root>" or "tfds:<name>" (siim_jax/data/sources/)
    c.data.split = "train"  # imagefolder: the sub-folder of <root>; tfds: the split
    c.data.tfds_data_dir = ""  # tfds: where the dataset is prepared ("" = TFDS's default)
    c.data.num_train = 1281167  # builtin: how many images to generate (other sources: their length)
    c.data.num_val = 500  # builtin: held-out labelled images of the validation split
    c.data.num_classes = 10  # builtin generator classes
    c.data.raw_size = 96  # builtin image side before cropping
    c.data.crop_min = 0.08
    c.data.num_masked = 118  # of (image_size / patch)^2 patches; exact for every image
    c.data.threads = 2

    c.knn = ml_collections.ConfigDict()
    c.knn.k = 20
    c.knn.temperature = 0.07
    c.knn.num_bank = 2048  # builtin training images used as the k-NN memory bank
    c.knn.num_query = 512  # held-out builtin images
    c.knn.batch_size = 256

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # multi-slice (TPU slices, or processes elsewhere, joined by DCN): how many slices the data / fsdp axes span;
    # the axes above are then per slice
    c.mesh.dcn_data = 1
    c.mesh.dcn_fsdp = 1
    c.mesh.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES
    return c


def linear_probe_config(variant: str = "B") -> ml_collections.ConfigDict:
    """The official linear probe (SPEC section 5): LARS, lr 0.1 x 16384 / 256, no weight decay, 90 epochs, 10
    warmup, batch 16384, random-resized crop (0.08, 1; the official single-draw sampler) + flip; judged on the
    validation split."""
    c = base_config()
    c.model.loss_type = "linear_probe"
    c.model.variant = variant
    c.batch_size = 16384
    c.epochs, c.warmup_epochs = 90, 10
    c.optim.blr, c.optim.min_lr, c.optim.weight_decay, c.optim.clip_norm = 0.1, 0.0, 0.0, 0.0
    c.data.crop_min = 0.08
    c.classifier.train_crop = "single_draw"  # official main_linprobe.py: util/crop.py's RandomResizedCrop
    c.evals = ("validation",)
    c.eval_every_steps = 780  # 10 epochs of ImageNet at batch 16384
    return c


def finetune_config(variant: str = "B") -> ml_collections.ConfigDict:
    """Official fine-tuning (SPEC section 5): AdamW (0.9, 0.999), blr 2.5e-4 at batch 1024, weight decay 0.05,
    layer decay 0.65, drop path 0.1, 100 epochs, 5 warmup, min lr 1e-6, mixup 0.8 / cutmix 1.0, label smoothing
    0.1, RandAugment m9-mstd0.5, no gradient clipping."""
    c = base_config()
    c.model.loss_type = "finetune"
    c.model.variant = variant
    c.batch_size = 1024
    c.epochs, c.warmup_epochs = 100, 5
    c.optim.blr, c.optim.min_lr, c.optim.weight_decay, c.optim.clip_norm = 2.5e-4, 1e-6, 0.05, 0.0
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.data.crop_min = 0.08
    c.evals = ("validation",)
    c.eval_every_steps = 1251  # an epoch of ImageNet at batch 1024
    return c


def fewshot_config(variant: str = "B") -> ml_collections.ConfigDict:
    """MSN's 1% few-shot protocol (SPEC section 5): class token of the last block (float32 encoder), each feature
    vector centred on its own mean and L2-normalised, logistic regression with penalty lambda / n_train (lambda
    0.1, 0.01 for ViT-L) on the ImageNet 1% subset (set fewshot.subset_file). The encoder sits in the
    linear-probe model (its head is unused)."""
    c = base_config()
    c.model.loss_type = "linear_probe"
    c.model.variant = variant
    c.fewshot.l2 = 0.1
    return c


def demo_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The demo's model and built-in data (configs/demo.py): a 2-block 64-wide ViT with 8x8 patches on 64x64
    views of 96x96 grey-level images, float32 on CPU, 4096 training images of 10 classes."""
    c.model.variant = "mu"
    c.model.image_size = 64
    c.model.decoder_width = 64
    c.model.decoder_heads = 2
    c.model.predictor_depth = 2
    c.model.dtype = "float32"  # bfloat16 matmuls are slow on CPU
    c.data.num_train = 4096
    c.data.raw_size = 96
    c.data.num_masked = 38
    c.classifier.num_classes = c.data.num_classes
    return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks a recipe so that overriding a key it lacks is an error naming the key."""
    c.lock()
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first inconsistent value and how to fix it; get_method(c) then checks what
    the method knows (siim_jax/methods/base.py: Method.check_config)."""
    m = c.model
    if m.remat not in ("none", "dots", "full"):
        raise ConfigError(f"config.model.remat={m.remat!r}: choose none, dots or full")
    if c.batch_size <= 0 or c.grad_accum_steps <= 0 or c.batch_size % c.grad_accum_steps:
        raise ConfigError(f"config.batch_size={c.batch_size} must be a positive multiple of "
                         f"config.grad_accum_steps={c.grad_accum_steps}")
    if c.total_steps <= 0 and c.epochs <= 0:
        raise ConfigError("set config.epochs > 0 or config.total_steps > 0")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"config.model.dtype={m.dtype!r}: choose float32, bfloat16 or float16")
    kind, _, location = c.data.source.partition(":")
    if not (c.data.source == "builtin" or (kind in ("imagefolder", "tfds") and location)):
        raise ConfigError(f"config.data.source={c.data.source!r}: use 'builtin', 'imagefolder:<root>' "
                          "or 'tfds:<name>'")
    if not 0 < c.data.crop_min <= 1:
        raise ConfigError(f"config.data.crop_min={c.data.crop_min} must lie in (0, 1]")
    if c.data.threads <= 0:
        raise ConfigError(f"config.data.threads={c.data.threads} must be > 0")
    if c.classifier.train_crop not in ("torchvision", "single_draw"):
        raise ConfigError(f"config.classifier.train_crop={c.classifier.train_crop!r}: choose torchvision or "
                          "single_draw")
    for key, valid, text in RANGES:
        value = c
        for part in key.split("."):
            value = value[part]
        if not valid(value):
            raise ConfigError(f"config.{key}={value!r} is out of range; valid: {text}")
    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        if not (isinstance(size, int) and (size >= 1 or size == -1)):
            raise ConfigError(f"config.mesh.{axis}={size!r} is out of range; valid: an integer >= 1, or -1 "
                              "(all devices the other axes leave)")
    for axis in ("dcn_data", "dcn_fsdp"):
        if not _positive_int(c.mesh[axis]):
            raise ConfigError(f"config.mesh.{axis}={c.mesh[axis]!r} is out of range; valid: an integer >= 1 (slices "
                              "that axis spans over DCN)")
    if [c.mesh[a] for a in ("data", "fsdp", "tensor")].count(-1) > 1:
        raise ConfigError("config.mesh.data/fsdp/tensor: at most one of them may be -1")


def _positive_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _int_at_least(low):
    return lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= low


# (key, check, valid range as the error states it); numeric keys with a range, checked before anything compiles
RANGES = (
    ("keep_checkpoints", _positive_int, "an integer >= 1 (how many of the newest checkpoints to keep)"),
    ("log_every_steps", _positive_int, "an integer >= 1"),
    ("checkpoint_every_steps", _positive_int, "an integer >= 1"),
    ("checkpoint_timeout_seconds", _positive_int, "an integer >= 1 (seconds a checkpoint's write may take)"),
    ("stop_vote_every_steps", _positive_int, "an integer >= 1"),
    ("eval_every_steps", _int_at_least(0), "an integer >= 0 (0 turns the k-NN monitor off)"),
    ("total_steps", _int_at_least(0), "an integer >= 0 (0: the length comes from config.epochs)"),
    ("warmup_steps", _int_at_least(-1), "an integer >= 0, or -1 to use config.warmup_epochs"),
    ("epochs", lambda x: x >= 0, ">= 0"),
    ("warmup_epochs", lambda x: x >= 0, ">= 0"),
    ("optim.blr", lambda x: x > 0, "> 0"),
    ("optim.min_lr", lambda x: x >= 0, ">= 0"),
    ("optim.b1", lambda x: 0 <= x < 1, "[0, 1)"),
    ("optim.b2", lambda x: 0 <= x < 1, "[0, 1)"),
    ("optim.weight_decay", lambda x: x >= 0, ">= 0"),
    ("optim.clip_norm", lambda x: x >= 0, ">= 0 (0 turns clipping off)"),
    ("ema.base_momentum", lambda x: 0 <= x <= 1, "[0, 1]"),
    ("loss.neg_weight", lambda x: x >= 0, ">= 0"),
    ("model.image_size", _positive_int, "an integer >= 1, a multiple of the patch size"),
    ("model.mae_mask_ratio", lambda x: 0 < x < 1, "(0, 1)"),
    ("data.num_train", _positive_int, "an integer >= 1"),
    ("data.num_classes", _positive_int, "an integer >= 1"),
    ("data.raw_size", _positive_int, "an integer >= 1"),
    ("knn.k", _positive_int, "an integer >= 1 (a bank smaller than k votes with all its images)"),
    ("knn.temperature", lambda x: x > 0, "> 0"),
    ("knn.num_bank", _positive_int, "an integer >= 1"),
    ("knn.num_query", _positive_int, "an integer >= 1"),
    ("knn.batch_size", _positive_int, "an integer >= 1"),
)
