"""Test setup: 8 fake CPU devices (set before JAX starts), one JAX compilation cache for the whole test run (written
by every process a test starts: subprocess_site/), and a shared tiny config."""

import os
import shutil
import tempfile

# --xla_backend_optimization_level=0: XLA:CPU compiles the tiny test models 2-4x faster (LLVM's optimisations
# are what take the time; they speed up large kernels, not these); results are the same up to float rounding.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache, shared by the xdist workers and every subprocess a test starts (they inherit
# the environment): the same tiny train step is compiled once per test run, not once per process. The first
# process to import this file (the xdist controller, or the only process) makes the folder and removes it at exit.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="siim_jax_test_jax_cache_")
# every compiled program, however small (the eager ops, the checks): reading one back costs less than compiling it
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# every process a test starts loads subprocess_site/sitecustomize.py: processes 1..N-1 of a multi-process run also
# write their compilation cache entries (JAX writes from process 0 only), so relaunches do not compile again
_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "subprocess_site")
if _SITE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_SITE, os.environ.get("PYTHONPATH")) if p)
# multi-process tests share 2 cores with up to a dozen processes: a heartbeat timeout of 60 s (peer watch 30 s)
# instead of 30 keeps a starved but live process from being taken for dead; the peer-watch test sets its own
os.environ.setdefault("SIIM_HEARTBEAT_TIMEOUT_SECONDS", "60")

import pytest  # noqa: E402

from siim_jax.config import base_config  # noqa: E402


def tiny_config(**overrides):
    """A test-sized SiameseIM config: 32px views, 8px patches (4x4 grid, 10 masked), 2-block 64-wide ViT."""
    c = base_config()
    c.batch_size = 8
    c.total_steps = 6
    c.warmup_steps = 2
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
    c.model.variant = "mu"
    c.model.image_size = 32
    c.model.decoder_width = 32
    c.model.decoder_heads = 2
    c.model.projector_depth = 1
    c.model.predictor_depth = 1
    c.model.dtype = "float32"
    c.model.mae_decoder_width = 32
    c.model.mae_decoder_depth = 1
    c.model.mae_decoder_heads = 2
    c.data.num_train = 64
    c.data.raw_size = 40
    c.data.num_masked = 10
    c.data.crop_min = 0.2
    c.knn.num_bank = 32
    c.knn.num_query = 16
    c.knn.batch_size = 16
    c.mesh.data = -1  # all (fake) devices
    return override(c, overrides)


def override(config, overrides: dict):
    """Sets dotted keys ("model.image_size": 32, as in --config.model.image_size=32) of an unlocked config;
    returns it locked."""
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    config.lock()
    return config


def recipe_config(name: str = "demo", **overrides):
    """configs/<name>.py's get_config() with `overrides` (keys as in --config.<key>=<value>), locked."""
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.unlock()
    return override(config, overrides)


@pytest.fixture
def tiny():
    return tiny_config


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable order otherwise): with two xdist workers a two-minute test that starts last
    leaves one worker idle at the end of the run; started first, the short tests fill in around it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture
def gcs(monkeypatch):
    """A fresh GCS server on 127.0.0.1 (tests/gcs_server.py) with an empty bucket `gs://bucket`; this process's
    environment points the clients at it (subprocesses inherit it). Yields the GcsServer."""
    from gcs_server import GcsServer
    server = GcsServer().start()
    server.create_bucket("bucket")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    _forget_object_store_clients()
    yield server
    server.stop()
    _forget_object_store_clients()
    shutil.rmtree(server.root, ignore_errors=True)


def _forget_object_store_clients():
    """gcsfs and etils keep one client per process, bound to the server they first met."""
    import sys
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].GCSFileSystem.clear_instance_cache()
    if "siim_jax.storage" in sys.modules:
        sys.modules["siim_jax.storage"].forget_clients()
