# The stop handler first, before JAX and the flags are imported: a SIGTERM from here on is a stop request
# (save, exit 75), not a kill.
from siim_jax.train.stop import StopRequest

StopRequest.install()

from siim_jax.train.main import run  # noqa: E402

run()
