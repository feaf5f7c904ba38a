"""Old name of siim_jax.tools.bench_input, kept working."""
import runpy

if __name__ == "__main__":
    runpy.run_module("siim_jax.tools.bench_input", run_name="__main__", alter_sys=True)
