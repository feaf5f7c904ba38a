from siim_jax.train.main import run

run()
