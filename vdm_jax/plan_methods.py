"""--mode=plan for the methods beside VDM's own training: the programs.

vdm_jax.plan compiles what a config's method runs, for a TPU slice or GPU
nodes, on a CPU host. For method 'vdm' that is the train step and the
sampler's denoiser (plan.train_step_program, plan.sample_step_program);
this module builds the others' programs, each as its driver builds it
(same functions, same mesh and shardings, abstract inputs):

  tune_a_video_sd  'tune': tune_sd.make_step on tune_sd.layout (the clip
                   split by frames over the devices, the state FSDP, when
                   the batch does not divide); 'sample': one guided step of
                   the edit (every prompt and the reconstruction, with and
                   without the text).
  svd              'sample': one guided denoiser call of image-to-video
                   (sample.task 'image_to_video'), or of the fused
                   bidirectional pair of in-betweening ('inbetween'), on
                   the config's mesh; with 'inbetween' also 'tune': one step
                   of the backward tune (one device, as --mode=tune_backward
                   runs).
  pretrained       'sample': one guided denoiser call of text-to-image.
  sinfusion        'train': one step of the three NextNets (one device).

The architecture is the folder's where config.pretrained.path names one
(its unet/config.json and scheduler, no weights read), else the released
model's (SD-1.5, SVD-img2vid-xt; SVD-img2vid's 14 frames for
in-betweening), said in the row's 'model'. Frame sizes come from the
config (and, where it leaves them to the input, from the input file).
"""

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdm_jax import denoiser
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import training

METHODS = ('tune_a_video_sd', 'svd', 'pretrained', 'sinfusion')


@dataclasses.dataclass
class Program:
  """One compiled program of a plan.

  Attributes:
    name: 'train', 'sample', 'tune'.
    fn: the jitted function; args: its abstract arguments (with shardings).
    devices: the devices it runs on (a prefix of the target's).
    mesh: how they are used, e.g. 'data=8 fsdp=1', 'frames over fsdp=8'.
    batch: examples per call.
    params: parameters of the model(s) (all, frozen included).
    remat, dtype: the settings it was built with.
    grad_accum_steps: microbatches of a train step (its scan body).
    kernels: (mesh, batch axes) for programs that do not enter
      attention.kernels_on themselves, else None.
    model: where the architecture came from.
    param_sharding: config.mesh.param_sharding where it applies.
    work_split: over how many devices the work is divided (0: all of
      them); 1 where every device computes the whole batch (a batch the
      mesh does not divide is replicated by the denoisers).
  """

  name: str
  fn: Any
  args: tuple
  devices: list
  mesh: str
  batch: int
  params: int
  remat: str
  dtype: str
  grad_accum_steps: int = 1
  kernels: Optional[tuple] = None
  model: str = ''
  param_sharding: str = ''
  work_split: int = 0

  def __post_init__(self):
    if not self.work_split:
      self.work_split = len(self.devices)


def _folder_config(config: ml_collections.ConfigDict, sub: str,
                   folder: str = '') -> Optional[dict]:
  """folder/sub's config (json), or None when no folder is configured."""
  from vdm_jax.pretrained import formats  # pylint: disable=g-import-not-at-top
  folder = folder or config.pretrained.path
  if not folder:
    return None
  path = os.path.join(folder, sub)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'{path}: no such folder. config.pretrained.path must name a'
        ' diffusers folder (or be empty to plan the released model).')
  return formats.model_config(path)


def _sd_parts(config: ml_collections.ConfigDict, remat: str = 'none'):
  """(SD UNet module, its DiscreteSchedule, model note, latent factor)."""
  from vdm_jax.pretrained import stable_diffusion  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import unet2d  # pylint: disable=g-import-not-at-top
  unet = _folder_config(config, 'unet')
  if unet is None:
    unet, scheduler = unet2d.SD15_CONFIG, stable_diffusion.SD15_SCHEDULER
    note, factor = 'SD-1.5 (built in: pretrained.path is empty)', 8
  else:
    scheduler = _folder_config(config, 'scheduler')
    vae = _folder_config(config, 'vae')
    factor = 2 ** (len(vae.get('block_out_channels', (0,) * 4)) - 1)
    note = config.pretrained.path
  module = unet2d.build(unet, dtype=config.pretrained.dtype, remat=remat)
  return module, schedules.from_scheduler_config(scheduler), note, factor


def _rounded(size: tuple[int, int], multiple: int) -> tuple[int, int]:
  return tuple(max(multiple, int(round(int(s) / multiple)) * multiple)
               for s in size)


def _video_hw(path: str, what: str) -> tuple[int, int]:
  from vdm_jax import video_io  # pylint: disable=g-import-not-at-top
  if not path:
    raise ValueError(f'{what} is 0 (the input video\'s own size) and no'
                     ' video is given: set the size to plan for.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file.')
  return tuple(video_io.read_video(path, max_frames=1).shape[1:3])


def _guided_text_program(module, schedule, params, mesh, shape, length,
                         frames: str, guided: bool):
  """One guided prediction (what a sampler step evaluates) of an SD UNet:
  jitted fn and abstract (params, z, logsnr, noise, cond)."""
  repl = sharding.replicated(mesh)
  b = shape[0]
  text = jax.ShapeDtypeStruct((b, length, module.cross_attention_dim),
                              jnp.float32, sharding=repl)
  cond = {'text': text}
  if guided:
    cond['text_uncond'] = text
  guidance = sampling.make_guidance(cfg_weight=1.0, null_text=guided)
  target = schedule.target

  def fn(p, z, logsnr, noise, cond):
    denoise_fn = denoiser.make_pretrained_denoise_fn(
        module, p, schedule, frames=frames, mesh=mesh)
    return sampling.guided_predictor(denoise_fn, target, cond, guidance)(
        z, logsnr, noise)

  z = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=repl)
  logsnr = jax.ShapeDtypeStruct((b,), jnp.float32, sharding=repl)
  return jax.jit(fn), (params, z, logsnr, z, cond)


def _split(batch: int, mesh) -> int:
  """Devices a denoiser's batch (guidance: conditional and unconditional
  halves in one call) is split over: the denoisers split only a batch the
  mesh divides, and compute any other whole on every device."""
  return mesh.size if batch % mesh.size == 0 else 1


def _mesh_note(mesh) -> str:
  return ' '.join(f'{k}={v}' for k, v in mesh.shape.items())


def tune_a_video_sd(config: ml_collections.ConfigDict, devices: list
                    ) -> list[Program]:
  """'tune' and 'sample' (the edit's guided step) of Tune-A-Video on SD."""
  from vdm_jax.adapt import inflate_sd  # pylint: disable=g-import-not-at-top
  from vdm_jax.adapt import tune_sd  # pylint: disable=g-import-not-at-top
  t, s = config.tune, config.sample
  inflate_sd.check_trainable(t.trainable)
  unet, schedule, note, factor = _sd_parts(config)
  hw = (int(t.height), int(t.width))
  if 0 in hw:
    own = _video_hw(t.video, 'tune.height or tune.width')
    hw = tuple(v or o for v, o in zip(hw, own))
  h, w = (v // factor for v in _rounded(hw, factor))
  frames = int(t.num_frames)
  step, args, place, trained, frozen = tune_sd.abstract_program(
      config, unet, schedule, frames, h, w, devices)
  split = {'frames': f'frames over fsdp={place.mesh.size}',
           'batch': _mesh_note(place.mesh),
           'none': 'one device'}[place.split]
  programs = [Program(
      'tune', step, args, list(place.mesh.devices.flat), split,
      config.training.batch_size,
      trained + (0 if t.trainable == 'lora' else frozen), t.remat,
      config.pretrained.dtype, model=note)]
  # The edit: the source's reconstruction and every prompt in one batch,
  # on the config's mesh, the tuned parameters replicated (edit_sd).
  mesh = sharding.make_mesh(config.mesh, devices)
  module = inflate_sd.inflate_module(unet, t.frame_norm)
  params = inflate_sd.abstract_params(module)
  prompts = 1
  if s.get('prompts_file'):
    from vdm_jax.text import encoders  # pylint: disable=g-import-not-at-top
    prompts = len(encoders.read_prompts(s.prompts_file))
  n = 1 + prompts  # The reconstruction and the prompts, in calls of
  if int(s.batch_size) > 0:  # sample.batch_size (edit_sd.invert_and_edit).
    n = min(n, int(s.batch_size))
  fn, sample_args = _guided_text_program(
      module, schedule,
      sharding.abstract(params, jax.tree.map(lambda _: sharding.replicated(mesh),
                                     params)),
      mesh, (n, frames, h, w, unet.in_channels), 77, 'video',
      float(s.guidance_scale) > 1.0)
  programs.append(Program('sample', fn, sample_args, list(devices),
                          _mesh_note(mesh), n, denoiser.count_params(params), 'none',
                          config.pretrained.dtype, model=note,
                          work_split=_split(
                              n * (2 if float(s.guidance_scale) > 1.0 else 1),
                              mesh)))
  return programs


def pretrained(config: ml_collections.ConfigDict, devices: list
               ) -> list[Program]:
  """'sample': one guided step of Stable Diffusion's text-to-image."""
  s = config.sample
  unet, schedule, note, factor = _sd_parts(config)
  size = int(unet.sample_size) * factor
  hw = _rounded((int(s.height) or size, int(s.width) or size), factor)
  mesh = sharding.make_mesh(config.mesh, devices)
  from vdm_jax.pretrained import unet2d  # pylint: disable=g-import-not-at-top
  params = unet2d.abstract_params(unet)
  shardings = sharding.state_shardings(params, mesh,
                                       config.mesh.param_sharding)
  b = int(s.batch_size)
  fn, args = _guided_text_program(
      unet, schedule, sharding.abstract(params, shardings), mesh,
      (b, 1, hw[0] // factor, hw[1] // factor, unet.in_channels), 77,
      'batch', float(s.guidance_scale) > 1.0)
  return [Program('sample', fn, args, list(devices), _mesh_note(mesh), b,
                  denoiser.count_params(params), 'none', config.pretrained.dtype,
                  model=note, param_sharding=config.mesh.param_sharding,
                  work_split=_split(
                      b * (2 if float(s.guidance_scale) > 1.0 else 1), mesh))]


def _svd_cond(b: int, h: int, w: int, channels: int, embed: int, ids: int,
              spec) -> dict:
  s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=spec)
  return {'image_latent': s((b, h, w, channels)),
          'image_embed': s((b, 1, embed)), 'added_time_ids': s((b, ids))}


def svd(config: ml_collections.ConfigDict, devices: list) -> list[Program]:
  """SVD's 'sample' (image-to-video or in-betweening) and, for
  in-betweening, the backward tune's step."""
  from vdm_jax.adapt import inbetween_svd  # pylint: disable=g-import-not-at-top
  from vdm_jax.adapt import tune_backward_svd  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import svd as svd_format  # pylint: disable=g-import-not-at-top
  s, c, p = config.sample, config.svd, config.pretrained
  inbetween = s.task == 'inbetween'
  unet_config = _folder_config(config, 'unet', c.xt_path or p.path)
  if unet_config is None:
    unet_config = svd_format.SVD_XT_CONFIG
    note = 'SVD-img2vid-xt (built in: pretrained.path is empty)'
    if inbetween:
      unet_config = dict(unet_config, num_frames=14)
      note = 'SVD-img2vid (built in: pretrained.path is empty)'
  else:
    note = c.xt_path or p.path
  vae = _folder_config(config, 'vae') or {}
  factor = 2 ** (len(vae.get('block_out_channels', (0,) * 4)) - 1)
  multiple = factor * 2 ** (len(unet_config.get('block_out_channels',
                                                (0,) * 4)) - 1)
  height, width = _rounded((c.height, c.width), multiple)
  h, w = height // factor, width // factor
  frames = int(c.num_frames) or int(unet_config.get('num_frames', 25))
  module = svd_format.build(unet_config, dtype=p.dtype)
  params = svd_format.abstract_params(module)
  mesh = sharding.make_mesh(config.mesh, devices)
  repl = sharding.replicated(mesh)
  rparams = sharding.abstract(params, jax.tree.map(lambda _: repl, params))
  latent_channels = module.in_channels // 2
  embed = int(module.cross_attention_dim)
  ids = 3
  z = jax.ShapeDtypeStruct((1, frames, h, w, latent_channels), jnp.float32,
                           sharding=repl)
  logsnr = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=repl)
  scale = sampling.guidance_ramp(float(s.image_guidance_min),
                                 float(s.image_guidance_max), frames)
  cond = functools.partial(_svd_cond, 1, h, w, latent_channels, embed, ids)
  mesh_note = _mesh_note(mesh)
  if not inbetween:
    def sample_fn(p_, z_, logsnr_, cond_):
      return sampling.image_guided(
          denoiser.make_edm_denoise_fn(module, p_, mesh), scale)(
              z_, logsnr_, cond_)
    return [Program('sample', jax.jit(sample_fn),
                    (rparams, z, logsnr, cond(repl)), list(devices),
                    mesh_note, 1, denoiser.count_params(params), 'none', p.dtype,
                    model=note, work_split=_split(2, mesh))]
  weight = s.inbetween_weight
  guidance = s.inbetween_guidance
  if guidance == 'auto':
    guidance = 'averaged' if weight == 'half' else 'own'
  ramp = sampling.averaged_ramp(scale) if guidance == 'averaged' else scale

  def pair_fn(pf, pb, z_, logsnr_, cf, cb):
    fused = sampling.fused_bidirectional(
        inbetween_svd.make_pair_fn(module, pf, pb, mesh),
        sampling.fusion_weights(weight, frames), ramp)
    return fused(z_, logsnr_, {'forward': cf, 'backward': cb})

  programs = [Program('sample', jax.jit(pair_fn),
                      (rparams, rparams, z, logsnr, cond(repl), cond(repl)),
                      list(devices), mesh_note, 1, 2 * denoiser.count_params(params), 'none',
                      p.dtype, model=note, work_split=_split(2, mesh))]
  # The backward tune: one device, nothing donated (tune_backward_svd).
  one = jax.sharding.SingleDeviceSharding(devices[0])
  tune_module = svd_format.build(unet_config, dtype=p.dtype, remat=c.remat)
  tx = optax.adamw(float(config.tune.backward_learning_rate), b1=0.9,
                   b2=0.999, eps=1e-8, weight_decay=1e-2)
  tuned = jax.eval_shape(inbetween_svd.split, params)
  opt = jax.eval_shape(tx.init, tuned)
  on_one = lambda tree: sharding.abstract(tree, jax.tree.map(lambda _: one, tree))
  b, f = int(config.tune.backward_batch_size), int(config.tune.num_frames)
  latents = jax.ShapeDtypeStruct((b, f, h, w, latent_channels), jnp.float32,
                                 sharding=one)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=one)
  step = jax.jit(functools.partial(tune_backward_svd.tune_step,
                                   unet=tune_module, tx=tx))
  tune_cond = functools.partial(_svd_cond, b, h, w, latent_channels, embed,
                                ids)(one)
  programs.append(Program(
      'tune', step, (on_one(tuned), on_one(opt), on_one(params), latents,
                     tune_cond, tune_cond, rng),
      [devices[0]], 'one device', b, denoiser.count_params(params), c.remat, p.dtype,
      model=note))
  return programs


def sinfusion(config: ml_collections.ConfigDict, devices: list,
              platform: str) -> list[Program]:
  """'train': the step of the three NextNets on one device."""
  from vdm_jax.sinfusion import data  # pylint: disable=g-import-not-at-top
  from vdm_jax.sinfusion import train as sf_train  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  if platform != 'cpu' and config.model.get('conv_impl', 'auto') == 'auto':
    with config.unlocked():
      config.model.conv_impl = 'xla'  # What 'auto' takes on GPU and TPU.
  sf_train.validate_config(config)
  d = config.data
  if d.path:
    video_shape = data.load_video(config).shape
    note = d.path
  else:
    side = int(d.max_size) or 256
    video_shape = (int(d.max_frames), side, side, 3)
    note = (f'{d.max_frames} frames of {side}x{side} (data.path is empty:'
            ' the largest frames data.max_size allows)')
  hw = data.crop_size(config, video_shape[1:3])
  models = sf_train.create_models(config, video_shape[-1])
  tx, lr_fn = training.create_optimizer(config)
  step = sf_train.make_train_step(config, models, tx, lr_fn, hw)
  state = jax.eval_shape(functools.partial(
      sf_train.init_state, models, tx, channels=video_shape[-1]),
                         jax.random.key(0))
  one = jax.sharding.SingleDeviceSharding(devices[0])
  args = (sharding.abstract(state, jax.tree.map(lambda _: one, state)),
          jax.ShapeDtypeStruct(video_shape, jnp.float32, sharding=one),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=one))
  return [Program('train', step, args, [devices[0]], 'one device',
                  int(config.training.batch_size), denoiser.count_params(state.params),
                  'none', 'float32',
                  int(config.training.grad_accum_steps), model=note)]


def programs(config: ml_collections.ConfigDict, devices: list,
             platform: str) -> list[Program]:
  """The programs config.method runs, built for `devices`."""
  method = config.method
  if method == 'tune_a_video_sd':
    return tune_a_video_sd(config, devices)
  if method == 'svd':
    return svd(config, devices)
  if method == 'pretrained':
    return pretrained(config, devices)
  if method == 'sinfusion':
    return sinfusion(config, devices, platform)
  raise ValueError(f'No plan for config.method={method!r}.')
