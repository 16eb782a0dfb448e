"""Entry point: the only module with flags.

  python -m vdm_jax.main --config=configs/quickstart.py --workdir=/tmp/qs \
      --mode=train [--config.training.batch_size=8 ...]

Modes: train (resumes from the workdir's last checkpoint), sample (EMA
parameters -> videos in workdir/samples), eval (samples scored with FVD),
embed_captions (a Hugging Face text encoder's caption embeddings ->
config.text.path, for text.encoder='files'; with --workdir of a trained
model, its text dimension is checked first), tune (Tune-A-Video's one-shot
tuning of a text-to-image model on config.tune.video; then --mode=sample
with sample.task='edit' edits it), tune_backward (Generative Inbetweening's
backward-motion tune of the image-to-video model in config.tune.base_workdir;
then --mode=sample with sample.task='inbetween'), plan (compiles the train
and sampling steps for the TPU/GPU targets of config.plan.targets on this
CPU host and says what fits; --workdir optional).
On several hosts, run the same command on each; jax.distributed is set up
automatically on TPU pods and SLURM, or from --coordinator_address,
--num_processes and --process_id.
"""

import logging as py_logging
import os
import warnings

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from vdm_jax import sharding

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py[:arg]).',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints,'
                               ' logs and samples (local path or gs://).')
_MODE = flags.DEFINE_enum('mode', 'train',
                          ['train', 'sample', 'eval', 'embed_captions',
                           'tune', 'tune_backward', 'plan'],
                          'What to run.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s index (multi-process).')
flags.mark_flags_as_required(['config'])

VDM_PACKAGE = os.path.dirname(os.path.abspath(__file__))


# Warnings that say nothing to a user: orbax re-registering its jax.Array
# handler at import, once per process.
_KNOWN_HARMLESS = ('Type handler registry type',)


class _LibraryNoise(py_logging.Filter):
  """Drops other packages' INFO lines (orbax writes kilobytes per save) and
  the known-harmless warnings; their other warnings and errors stay."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.pathname.startswith(VDM_PACKAGE):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    return not str(record.msg).startswith(_KNOWN_HARMLESS)


def cpu_only_host() -> None:
  """Runs JAX on the CPU when this host has no accelerator device files.

  With the GPU/TPU compiler packages installed (requirements-plan.txt) on a
  CPU-only host, JAX would try both plugins at start and print their
  failures (a CUDA traceback, libtpu errors) before falling back to the CPU;
  JAX_PLATFORMS, when set, still decides.
  """
  if os.environ.get('JAX_PLATFORMS'):
    return
  accelerators = ('/dev/nvidiactl', '/dev/nvidia0', '/dev/kfd', '/dev/accel0',
                  '/dev/vfio/0')
  if not any(os.path.exists(p) for p in accelerators):
    jax.config.update('jax_platforms', 'cpu')


def quiet_libraries() -> None:
  """Keeps vdm_jax's progress lines and every warning in the terminal.

  Python's warning about os.fork() in a multithreaded process is silenced
  for `subprocess` alone: it forks only to exec (ffmpeg writing a video),
  which is safe; any other fork still warns.
  """
  logging.get_absl_handler().addFilter(_LibraryNoise())
  warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called',
                          category=RuntimeWarning, module='subprocess')


def main(argv):
  del argv
  quiet_libraries()
  cpu_only_host()
  if _MODE.value == 'plan':
    from vdm_jax import plan  # pylint: disable=g-import-not-at-top
    plan.prepare_host()
    plan.plan(_CONFIG.value, _WORKDIR.value)
    return
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  logging.info('JAX process %d/%d, devices: %s', jax.process_index(),
               jax.process_count(), jax.devices())
  config, workdir = _CONFIG.value, _WORKDIR.value
  if _MODE.value == 'embed_captions':
    from vdm_jax.text import hf  # pylint: disable=g-import-not-at-top
    hf.embed_captions(config, workdir)
    return
  if not workdir:
    raise app.UsageError(f'--mode={_MODE.value} needs --workdir.')
  if config.method == 'tune_a_video_sd':  # configs/tune_a_video_sd.py
    if _MODE.value not in ('tune', 'sample'):
      raise app.UsageError(f'--mode={_MODE.value} does not apply to '
                           'Tune-A-Video on SD; use --mode=tune or sample.')
    if _MODE.value == 'tune':
      from vdm_jax.adapt import tune_sd  # pylint: disable=g-import-not-at-top
      tune_sd.tune(config, workdir)
    else:
      from vdm_jax.adapt import edit_sd  # pylint: disable=g-import-not-at-top
      edit_sd.edit(config, workdir)
    return
  if config.method == 'svd':  # configs/svd.py
    if _MODE.value not in ('sample', 'tune_backward'):
      raise app.UsageError(f'--mode={_MODE.value} does not apply to Stable '
                           'Video Diffusion; use --mode=sample or '
                           'tune_backward.')
    if _MODE.value == 'tune_backward':
      from vdm_jax.adapt import tune_backward_svd  # pylint: disable=g-import-not-at-top
      tune_backward_svd.tune_backward(config, workdir)
    else:
      from vdm_jax import sample_svd  # pylint: disable=g-import-not-at-top
      sample_svd.sample_and_save(config, workdir)
    return
  if _MODE.value == 'tune':
    from vdm_jax.adapt import tune  # pylint: disable=g-import-not-at-top
    tune.tune(config, workdir)
    return
  if _MODE.value == 'tune_backward':
    from vdm_jax.adapt import tune_backward  # pylint: disable=g-import-not-at-top
    tune_backward.tune_backward(config, workdir)
    return
  if config.method == 'pretrained':  # configs/stable_diffusion.py
    if _MODE.value != 'sample':
      raise app.UsageError(f'--mode={_MODE.value} does not apply to a '
                           'pretrained text-to-image config; use --mode=sample.')
    from vdm_jax import sample_pretrained  # pylint: disable=g-import-not-at-top
    sample_pretrained.sample_and_save(config, workdir)
    return
  if config.method == 'sinfusion':
    if _MODE.value == 'train':  # The package never imports the optimizer.
      from vdm_jax.sinfusion import train as program  # pylint: disable=g-import-not-at-top
    else:
      from vdm_jax import sinfusion as program  # pylint: disable=g-import-not-at-top
  elif _MODE.value == 'train':
    from vdm_jax import train as program  # pylint: disable=g-import-not-at-top
  elif _MODE.value == 'sample':
    from vdm_jax import sample as program  # pylint: disable=g-import-not-at-top
  else:
    from vdm_jax import evaluate as program  # pylint: disable=g-import-not-at-top
  if _MODE.value == 'train':
    program.train(config, workdir)
  elif _MODE.value == 'sample':
    program.sample_and_save(config, workdir)
  elif config.method == 'sinfusion':
    program.sample_and_evaluate(config, workdir)
  else:
    program.sample_and_evaluate(
        config, workdir,
        config_path=config_flags.get_config_filename(flags.FLAGS['config']))


if __name__ == '__main__':
  app.run(main)
