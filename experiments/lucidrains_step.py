"""One train step of lucidrains/video-diffusion-pytorch's Unet3D, timed.

Run by experiments/benchmark_vs_lucidrains.py with a Python that has
PyTorch and video-diffusion-pytorch (experiments/requirements-lucidrains.txt,
installed with --no-deps); not part of the project's own environment.

  python experiments/lucidrains_step.py --dim=64 --dim_mults=1,2,4 \
      --frames=8 --size=32 --batch=2 --steps=5

The step is GaussianDiffusion's training loss (L2 on the noise, as ours
trains), its backward pass and an Adam update. FLOPs are counted by
torch.utils.flop_counter.FlopCounterMode over one such step: 2 per
multiply-add of matmuls, convolutions and attention, forward and backward,
nothing for elementwise work. Prints one JSON line.
"""

import argparse
import json
import statistics
import sys
import time
import types


def _stub_torchvision():
  # video_diffusion_pytorch imports torchvision's transforms and utils at
  # module level for its Dataset and Trainer, which this step does not use;
  # PyPI's torchvision does not load beside the CPU build of torch.
  tv = types.ModuleType('torchvision')
  tv.transforms = types.ModuleType('torchvision.transforms')
  tv.utils = types.ModuleType('torchvision.utils')
  tv.transforms.ToTensor = lambda: None  # A default argument, evaluated.
  sys.modules.update({'torchvision': tv,
                      'torchvision.transforms': tv.transforms,
                      'torchvision.utils': tv.utils})


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--dim', type=int, default=64)
  parser.add_argument('--dim_mults', default='1,2,4')
  parser.add_argument('--frames', type=int, default=8)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()

  _stub_torchvision()
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  import video_diffusion_pytorch as vdp  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  unet = vdp.Unet3D(dim=args.dim,
                    dim_mults=tuple(int(m) for m in args.dim_mults.split(',')))
  diffusion = vdp.GaussianDiffusion(unet, image_size=args.size,
                                    num_frames=args.frames, loss_type='l2')
  opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)
  video = torch.rand(args.batch, 3, args.frames, args.size, args.size)

  def step():
    opt.zero_grad(set_to_none=True)
    loss = diffusion(video)
    loss.backward()
    opt.step()
    return loss.item()

  counter = flop_counter.FlopCounterMode(display=False)
  with counter:
    step()
  flops = counter.get_total_flops()
  for _ in range(args.warmup):
    step()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)
  print(json.dumps({
      'impl': 'lucidrains/video-diffusion-pytorch 0.7.0',
      'torch': torch.__version__, 'threads': torch.get_num_threads(),
      'params': sum(p.numel() for p in unet.parameters()),
      'step_time_s': median, 'step_times_s': times,
      'matmul_conv_flops_per_step': flops,
      'matmul_conv_flops_per_s': flops / median,
  }))


if __name__ == '__main__':
  main()
