"""Memory of decoding with the full-size SD and SVD autoencoders, compiled.

  python experiments/autoencoder_memory.py [--dtypes=float32,bfloat16]
      [--sizes=512x512,1024x576] [--frames=1,14]

For each autoencoder (SD's AutoencoderKL, SVD's AutoencoderKLTemporalDecoder
at their published configs), frame size W x H, frames per decode call and
compute dtype: XLA's memory_analysis() of `decode` compiled from abstract
shapes (jax.jit(...).lower(ShapeDtypeStructs).compile(); random weights are
never made): temp bytes (activations), argument bytes (the float32
parameters and the latents) and output bytes. SD's decoder is per frame, so
its figures scale with the frames of a call; SVD's temporal decoder sees
all frames of a clip in one call. Figures are XLA:CPU's (attention 'xla');
an accelerator's compiler schedules differently, so take them as the order
of magnitude there.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from vdm_jax.pretrained import autoencoder

FLAGS = flags.FLAGS
flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes.')
flags.DEFINE_list('sizes', ['512x512', '1024x576'], 'Frame sizes WxH.')
flags.DEFINE_list('frames', ['1'], 'Frames per decode call.')
flags.DEFINE_list('models', ['sd', 'svd'], 'Autoencoders: sd, svd.')

_LEVELS = [128, 256, 512, 512]
CONFIGS = {
    'sd': dict(_class_name='AutoencoderKL', block_out_channels=_LEVELS,
               layers_per_block=2, latent_channels=4, norm_num_groups=32,
               down_block_types=['DownEncoderBlock2D'] * 4,
               up_block_types=['UpDecoderBlock2D'] * 4),
    'svd': dict(_class_name='AutoencoderKLTemporalDecoder',
                block_out_channels=_LEVELS, layers_per_block=2,
                latent_channels=4,
                down_block_types=['DownEncoderBlock2D'] * 4),
}
MIB = 2 ** 20


def decode_memory(name: str, width: int, height: int, frames: int,
                  dtype: str) -> dict[str, float]:
  """MiB of one compiled decode call: temp, arguments, output."""
  module = autoencoder.build(CONFIGS[name], dtype=dtype, attention='xla')
  params = autoencoder.abstract_params(module)
  f = module.downsample_factor
  z = jax.ShapeDtypeStruct((frames, height // f, width // f, 4), jnp.float32)
  if name == 'svd':
    def fn(p, z):
      return module.apply({'params': p}, z, frames, method='decode')
  else:
    def fn(p, z):
      return module.apply({'params': p}, z, method='decode')
  mem = jax.jit(fn).lower(params, z).compile().memory_analysis()
  return dict(temp=mem.temp_size_in_bytes / MIB,
              args=mem.argument_size_in_bytes / MIB,
              out=mem.output_size_in_bytes / MIB)


def main(argv):
  del argv
  print('| model | frames x W x H | dtype | temp MiB | args MiB | out MiB |'
        ' compile s |')
  print('|---|---|---|---|---|---|---|')
  for name in FLAGS.models:
    for size in FLAGS.sizes:
      width, height = (int(v) for v in size.split('x'))
      for frames in FLAGS.frames:
        for dtype in FLAGS.dtypes:
          start = time.time()
          m = decode_memory(name, width, height, int(frames), dtype)
          print(f'| {name} | {frames} x {width} x {height} | {dtype} | '
                f'{m["temp"]:.0f} | {m["args"]:.0f} | {m["out"]:.1f} | '
                f'{time.time() - start:.0f} |', flush=True)


if __name__ == '__main__':
  app.run(main)
