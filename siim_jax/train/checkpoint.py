"""Orbax checkpoints in <workdir>/checkpoints: async saves, keep the newest N, restore into given shardings.

Each step directory holds the train state and a small JSON record of the model config, checked on restore so
that a checkpoint of another model is a readable error, not a shape mismatch deep inside Orbax.
"""

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    pass


def model_signature(config: ml_collections.ConfigDict) -> dict:
    """The config values that fix the shapes of the train state."""
    return {"model": json.loads(config.model.to_json()), "num_masked": config.data.num_masked}


class Checkpointer:
    def __init__(self, workdir: str, config: ml_collections.ConfigDict):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.signature = model_signature(config)
        options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True,
                                               enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "signature"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        """Starts an async save of `state` at `step` (no-op if that step is already saved)."""
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        signature=ocp.args.JsonSave(self.signature)))

    def restore(self, step: int, abstract_state):
        """Restores the state saved at `step` into the shardings of `abstract_state` (ShapeDtypeStructs)."""
        saved = self.manager.restore(step, args=ocp.args.Composite(signature=ocp.args.JsonRestore()))["signature"]
        if saved != self.signature:
            diff = {k: (saved.get(k), v) for k, v in self.signature.items() if saved.get(k) != v}
            raise CheckpointMismatchError(
                f"checkpoint {self.directory}/{step} was written by another model config "
                f"(saved vs current: {diff}); use another --workdir or the matching recipe")
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    """ShapeDtypeStructs with the given shardings, the restore target for `state`'s structure."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
