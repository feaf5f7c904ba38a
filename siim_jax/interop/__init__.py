"""PyTorch interoperability: export to timm / MAE / official SiameseIM key names, import of those files into
the train state, and a deterministic loss for comparisons with a PyTorch implementation.

    from siim_jax import interop
    method, state = interop.load_workdir_state("/tmp/run")                 # any saved step, any mesh
    interop.write_state_dict(interop.export_state_dict(method, state), "encoder.safetensors", "safetensors")
    state = interop.import_state_dict(method, state, interop.read_state_dict("sim_base_1600ep.pth"))
    interop.pretraining_loss(method, state, batch, with_grads=True)

`method` is the training method (siim_jax.methods.get_method(config)) whose train state `state` is.

Command lines: python -m siim_jax.export, python -m siim_jax.import_weights.
"""

from siim_jax.interop.convert import (StateDictMismatchError, classifier_state_dict, detect_kind, export_state_dict,
                                      import_state_dict, interpolate_pos_embed, load_workdir_state, workdir_config)
from siim_jax.interop.files import CheckpointFileError, read_state_dict, write_state_dict
from siim_jax.interop.keys import state_layout
from siim_jax.interop.loss import pretraining_loss

__all__ = ["CheckpointFileError", "StateDictMismatchError", "classifier_state_dict", "detect_kind", "export_state_dict",
           "import_state_dict", "interpolate_pos_embed", "load_workdir_state", "pretraining_loss",
           "read_state_dict", "state_layout", "workdir_config", "write_state_dict"]
