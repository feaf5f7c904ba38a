"""--pretrained for the evaluation commands: a pretraining workdir (its newest checkpoint), or a PyTorch file
(.pth / .safetensors: a timm / MAE encoder or an official SiameseIM pretraining state), read through the strict,
safe import of siim_jax.interop; the encoder goes into the evaluation model's encoder. Either may be on gs://
(siim_jax.storage)."""

import json
import logging

import jax
import numpy as np

from siim_jax import storage
from siim_jax.interop import (CheckpointFileError, detect_kind, export_state_dict, import_state_dict,
                              load_workdir_state, read_state_dict, state_layout)

log = logging.getLogger(__name__)
NO_PRETRAINING = "none"  # --pretrained none: a randomly initialised encoder (the baseline)

ENCODER_PREFIXES = ("patch_embed.", "blocks.", "norm.")
ENCODER_KEYS = ("cls_token", "pos_embed")


def _is_encoder_key(key: str) -> bool:
    return key in ENCODER_KEYS or key.startswith(ENCODER_PREFIXES)


def pretrained_encoder(path: str, branch: str = "online") -> tuple[dict[str, np.ndarray], str]:
    """(encoder state dict under timm names, a description of where it came from).

    branch: "online" (what the official evaluations use) or "target" (the EMA encoder, SiameseIM only).
    """
    if branch not in ("online", "target"):
        raise CheckpointFileError(f"--encoder={branch!r}: choose online or target")
    if storage.isdir(path):
        pretraining, state = load_workdir_state(path)
        step = int(state.step)
        return export_state_dict(pretraining, state, "encoder", branch), f"{path} step {step} ({branch} encoder)"
    state_dict = read_state_dict(path)
    if detect_kind(state_dict) == "full":  # official pretraining state: online keys bare, target under mm_
        if branch == "target":
            state_dict = {k[len("mm_"):]: v for k, v in state_dict.items() if k.startswith("mm_")}
        state_dict = {k: v for k, v in state_dict.items() if _is_encoder_key(k)}
    elif branch == "target":
        raise CheckpointFileError(f"--encoder=target: {path} holds one encoder, not a pretraining state with a "
                                  "target branch; use --encoder=online")
    return state_dict, f"{path} ({branch} encoder)"


def with_pretrained_encoder(state_dict: dict[str, np.ndarray]):
    """The trainer's initial_weights: (method, fresh TrainState) -> the same state with the encoder from
    `state_dict` (strict: every encoder key must fit; StateDictMismatchError lists what does not). A final
    encoder norm (MAE) that the evaluation model does not have is left out, as timm's global_pool='avg' models
    do; a position table of another grid is resized."""
    def load(method, state):
        wanted = {spec.key for spec in state_layout(method, state, "encoder").specs}
        unused = sorted(k for k in state_dict if k.startswith("norm.") and k not in wanted)
        if unused:
            log.info("pretrained encoder: leaving out its final norm (%s)", ", ".join(unused))
        kept = {k: v for k, v in state_dict.items() if k not in unused}
        return import_state_dict(method, state, kept, kind="encoder", log=log.info)
    return load


def record_pretrained(workdir: str, pretrained: str, branch: str) -> None:
    """<workdir>/pretrained.json: where the encoder came from (process 0)."""
    if jax.process_index() != 0:
        return
    storage.makedirs(workdir)
    where = pretrained if pretrained == NO_PRETRAINING else storage.absolute(pretrained)
    storage.write_text(storage.join(workdir, "pretrained.json"), json.dumps({"pretrained": where, "encoder": branch}))

