"""Imported by every Python process a test starts (conftest.py puts this folder first on PYTHONPATH).

JAX writes its persistent compilation cache from process 0 only, and on CPU every process of a multi-process run
has cache keys of its own (its topology fingerprint differs), so processes 1..N-1 of local.sh runs compiled every
program at every launch (~10 CPU-s each for the tiny train step on 2 busy cores). Here every process writes its
entries, so a relaunch of the same run reads them back as process 0 does. Only the test processes are changed;
JAX is patched when it is imported (nothing is imported here), and a failed write only costs a compile.
"""

import importlib.abc
import importlib.util
import sys


def _write_from_every_process(compiler) -> None:
    original = compiler._cache_write

    def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
        if compiler.distributed.global_state.process_id in (None, 0) or host_callbacks:
            return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
        try:
            compiler.compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                               int(compile_time_secs))
        except Exception:  # noqa: BLE001 - the next launch compiles again
            pass

    compiler._cache_write = cache_write


class _PatchOnImport(importlib.abc.MetaPathFinder):
    NAME = "jax._src.compiler"

    def find_spec(self, name, path, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            if hasattr(module, "_cache_write"):
                _write_from_every_process(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchOnImport())
