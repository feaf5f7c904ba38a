"""Old name of siim_jax.tools.visualize, kept working."""
import runpy

if __name__ == "__main__":
    runpy.run_module("siim_jax.tools.visualize", run_name="__main__", alter_sys=True)
