"""SinFusion: diffusion models trained on a single video.

Nikankin, Haim, Irani (2022), arXiv 2211.11743. `vdm_jax.main` calls these
when `config.method == 'sinfusion'` (configs/single_video.py):

  train_and_evaluate(config, workdir)   --mode=train  (train.py)
  sample_and_save(config, workdir)      --mode=sample (generate.py)
  sample_and_evaluate(config, workdir)  --mode=eval   (metrics.py)

docs/sinfusion.md describes the models, the generation modes and the
metrics.
"""

from vdm_jax.sinfusion.generate import sample_and_save
from vdm_jax.sinfusion.metrics import sample_and_evaluate
from vdm_jax.sinfusion.train import train_and_evaluate

__all__ = ['train_and_evaluate', 'sample_and_save', 'sample_and_evaluate']
