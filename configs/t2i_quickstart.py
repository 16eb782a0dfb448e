"""Text-to-image on the captioned synthetic shapes: the base of Tune-A-Video.

  python -m vdm_jax.main --config=configs/t2i_quickstart.py --workdir=runs/t2i

The text-to-video quickstart's network and captions with every temporal
attention left out (model.temporal_attention=False), trained on single
frames: each example is one frame of a synthetic clip with the clip's
caption. configs/tune_a_video.py inflates it into a video model and tunes
it on one video (--mode=tune; README "Tune-A-Video").
"""

from configs import t2v_quickstart


def get_config(arg=None):
  config = t2v_quickstart.get_config(arg)
  config.data.num_frames = 1
  config.model.temporal_attention = False
  # Images: no frame index, and the plain cosine schedule (the text-to-
  # video quickstart's shift and frame positions are for its motion).
  config.model.frame_positions = False
  config.diffusion.schedule = 'cosine'
  config.data.caption_holdout = 0  # Edits may ask for any combination.
  config.training.batch_size = 32
  config.training.num_train_steps = 3000
  config.sample.num_videos = 8
  config.sample.prompt = 'a blue circle moving right'
  return config
