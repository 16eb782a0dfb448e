"""Image-to-video and keyframe in-betweening on the synthetic dataset, on CPU.

  python -m vdm_jax.main --config=configs/i2v_quickstart.py --workdir=runs/i2v
  python -m vdm_jax.main --config=configs/i2v_quickstart.py --workdir=runs/i2v \
      --mode=sample --config.sample.task=image_to_video
  python -m vdm_jax.main --config=configs/i2v_quickstart.py \
      --workdir=runs/i2v_backward --mode=tune_backward \
      --config.tune.base_workdir=runs/i2v
  python -m vdm_jax.main --config=configs/i2v_quickstart.py \
      --workdir=runs/i2v_backward --mode=sample --config.sample.task=inbetween

The quickstart's model and data (configs/quickstart.py) with the first
frame as an input (model.image_condition: Stable Video Diffusion's
conditioning); the backward-motion model of Generative Inbetweening tunes
only its temporal attentions' value and output projections
(adapt/tune_backward.py). docs/inbetween.md has the comparison.
"""

from configs import quickstart


def get_config(arg=None):
  config = quickstart.get_config(arg)
  config.model.image_condition = True
  config.sample.task = 'image_to_video'
  config.sample.sampler = 'ddim'
  config.sample.num_steps = 32
  config.tune.backward_steps = 500
  config.training.checkpoint_every_steps = 250
  return config
