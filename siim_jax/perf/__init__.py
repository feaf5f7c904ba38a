"""Performance accounting shared by `siim_jax.bench_step` and `siim_jax.aot`: analytic FLOPs, chip peaks, and
what a compiled step holds (memory, XLA FLOPs, collective bytes)."""
