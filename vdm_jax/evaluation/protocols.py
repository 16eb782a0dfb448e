"""Named FVD protocols: everything besides the network that moves the score.

Each preset names the paper table or public code that defines it
(`Protocol.source`); docs/fvd.md explains the differences and
docs/references.md lists the papers.
"""

import dataclasses
from typing import Optional

RESIZE_MODES = ('reference', 'magvit')
CLIP_STARTS = ('random', 'first')
FEATURES = ('logits_mean', 'pool')


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How an FVD number was computed; all fields change the score.

  Attributes:
    name: the key in `PROTOCOLS`, reported with every score.
    resolution: frame size (H = W) at scoring, or None for "the dataset's".
    num_frames: frames per scored clip (conditioning frames included).
    resize: 'reference' (one bilinear resize to 224) or 'magvit' (to 64x64,
      then to 224).
    num_generated: generated videos in total (over all folds).
    num_real: real clips in total (over all folds).
    real_split: where the real clips come from.
    conditioning_frames: ground-truth frames given to the model; they stay
      inside the `num_frames` scored frames.
    folds: the features are split into this many contiguous groups; the
      score is the mean (and std) over groups.
    feature: I3D output used ('logits_mean' everywhere in the literature).
    source: where the protocol is defined.
    clip_start: where real (and conditioning) clips start in their videos:
      'random' or 'first' (frames 0..num_frames-1 of each video).
  """

  name: str
  resolution: Optional[int]
  num_frames: int
  resize: str
  num_generated: int
  num_real: int
  real_split: str
  conditioning_frames: int
  folds: int
  feature: str
  source: str
  clip_start: str = 'random'


PROTOCOLS: dict[str, Protocol] = {
    # VDM Table 2 (BAIR, 1 -> 15 at 64x64, FVD 66.92): the FitVid protocol,
    # 100 samples for each of the 256 test videos against the first 16-frame
    # clip of each test video (Babaeizadeh et al. 2021, FitVid).
    'bair_vdm': Protocol(
        name='bair_vdm',
        resolution=64,
        num_frames=16,
        resize='reference',
        num_generated=25_600,
        num_real=256,
        real_split='test (first 16 frames of each of the 256 videos)',
        conditioning_frames=1,
        folds=1,
        feature='logits_mean',
        source=(
            'VDM (Ho et al. 2022) Sec. 4.2, Table 2; FitVid (Babaeizadeh et'
            ' al. 2021). MAGVIT (Yu et al. 2023) App. C: VDM scored another'
            ' camera view; name the view.'
        ),
        clip_start='first',
    ),
    # MAGVIT Table 10 (UCF-101 class-conditional 16x128x128): 10,000 samples
    # x 4 folds against random train clips, `videogvt/tools/compute_fvd.py`
    # with its 64x64 intermediate resize (google-research/magvit).
    'ucf101_magvit': Protocol(
        name='ucf101_magvit',
        resolution=128,
        num_frames=16,
        resize='magvit',
        num_generated=40_000,
        num_real=40_000,
        real_split='train (random 16-frame clips)',
        conditioning_frames=0,
        folds=4,
        feature='logits_mean',
        source=(
            'MAGVIT (Yu et al. 2023) Table 10; google-research/magvit'
            ' videogvt/tools/compute_fvd.py.'
        ),
    ),
    # StyleGAN-V `fvd2048_16f` (also DIGAN, Latte): 2048 generated videos vs
    # 2048 random real 16-frame clips at the dataset resolution. StyleGAN-V
    # runs a TorchScript port of the same TF-Hub I3D that upsamples with
    # half-pixel centers and uses 1/n covariances; the counts are what this
    # preset reproduces.
    'stylegan_v_2048': Protocol(
        name='stylegan_v_2048',
        resolution=None,
        num_frames=16,
        resize='reference',
        num_generated=2048,
        num_real=2048,
        real_split='train (random 16-frame clips)',
        conditioning_frames=0,
        folds=1,
        feature='logits_mean',
        source=(
            'StyleGAN-V (Skorokhodov et al. 2022) src/metrics/'
            'frechet_video_distance.py, metric fvd2048_16f.'
        ),
    ),
    # VDM Kinetics-600 (5 -> 11 at 64x64, FVD 16.2 +- 0.34): 50k test
    # videos, random 16-frame subsequences sampled without replacement, the
    # same subsequences for samples and ground truth (VDM Sec. 4.2, Table 3;
    # the DVD-GAN protocol, with replacement, gives 16.9).
    'kinetics600_vdm': Protocol(
        name='kinetics600_vdm',
        resolution=64,
        num_frames=16,
        resize='reference',
        num_generated=50_000,
        num_real=50_000,
        real_split='test (same random 16-frame subsequences as the samples)',
        conditioning_frames=5,
        folds=1,
        feature='logits_mean',
        source='VDM (Ho et al. 2022) Sec. 4.2, Table 3.',
    ),
}
