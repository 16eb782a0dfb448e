"""SinFusion: diffusion models trained on a single video.

Nikankin, Haim, Irani (2022), arXiv 2211.11743. `vdm_jax.main` calls these
when `config.method == 'sinfusion'` (configs/single_video.py):

  train.train(config, workdir)          --mode=train  (train.py)
  sample_and_save(config, workdir)      --mode=sample (generate.py)
  sample_and_evaluate(config, workdir)  --mode=eval   (metrics.py)

The training program is not imported here: the sample and eval programs
never import the optimizer (`from vdm_jax.sinfusion import train` for it).
docs/sinfusion.md describes the models, the generation modes and the
metrics.
"""

from vdm_jax.sinfusion.generate import sample_and_save
from vdm_jax.sinfusion.metrics import sample_and_evaluate

__all__ = ['sample_and_save', 'sample_and_evaluate']
