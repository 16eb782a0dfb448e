"""vdm_jax: Video Diffusion Models (Ho et al. 2022) in JAX/Flax."""
