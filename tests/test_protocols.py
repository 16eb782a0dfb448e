"""The FVD protocol presets pinned to the numbers their papers state.

An FVD score is only comparable under the protocol that produced it, so a
preset that drifts (a sample count, a frame count, the conditioning frames
or the resolution) silently breaks every comparison made with it:
  bair_vdm: VDM (Ho et al. 2022) Sec. 4.2, Table 2, after FitVid
    (Babaeizadeh et al. 2021): 1 -> 15 frames at 64x64, 100 samples for
    each of the 256 test videos (25,600) against those 256 test videos,
    scored on their first 16 frames.
  kinetics600_vdm: VDM Sec. 4.2, Table 3: 5 -> 11 frames at 64x64, 50,000
    samples against the same 50,000 random test subsequences.
  ucf101_magvit: MAGVIT (Yu et al. 2023) Table 10: class-conditional
    16 frames at 128x128, 10,000 samples per run, 4 runs (folds), with the
    64x64 intermediate resize of its FVD code.
  stylegan_v_2048: StyleGAN-V (Skorokhodov et al. 2022) fvd2048_16f:
    2,048 generated against 2,048 real 16-frame clips at the dataset's
    resolution.
"""

import dataclasses

import pytest

from vdm_jax.evaluation import protocols

EXPECTED = {
    'bair_vdm': dict(
        resolution=64, num_frames=16, conditioning_frames=1,
        num_generated=25_600, num_real=256, folds=1, resize='reference',
        clip_start='first'),
    'kinetics600_vdm': dict(
        resolution=64, num_frames=16, conditioning_frames=5,
        num_generated=50_000, num_real=50_000, folds=1, resize='reference'),
    'ucf101_magvit': dict(
        resolution=128, num_frames=16, conditioning_frames=0,
        num_generated=40_000, num_real=40_000, folds=4, resize='magvit'),
    'stylegan_v_2048': dict(
        resolution=None, num_frames=16, conditioning_frames=0,
        num_generated=2048, num_real=2048, folds=1, resize='reference'),
}


@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_preset_fields(name):
  proto = protocols.PROTOCOLS[name]
  assert proto.name == name
  got = {k: getattr(proto, k) for k in EXPECTED[name]}
  assert got == EXPECTED[name]
  # Every preset scores the mean of the 400 I3D logits (Unterthiner et al.
  # 2018), as all four papers do.
  assert proto.feature == 'logits_mean'


def test_bair_is_100_samples_per_test_video():
  proto = protocols.PROTOCOLS['bair_vdm']
  assert proto.num_real == 256  # BAIR's test videos.
  assert proto.num_generated == 100 * proto.num_real
  # 1 given frame, 15 generated: the scored clip holds both.
  assert proto.num_frames - proto.conditioning_frames == 15
  assert 'test' in proto.real_split and '256' in proto.real_split


def test_kinetics_is_5_to_11_on_test_subsequences():
  proto = protocols.PROTOCOLS['kinetics600_vdm']
  assert proto.num_frames - proto.conditioning_frames == 11
  assert proto.num_generated == proto.num_real  # The same subsequences.
  assert proto.real_split.startswith('test')
  assert proto.clip_start == 'random'


def test_ucf101_is_four_folds_of_10000():
  proto = protocols.PROTOCOLS['ucf101_magvit']
  assert proto.num_generated // proto.folds == 10_000
  assert proto.num_generated % proto.folds == 0
  assert proto.num_real // proto.folds == 10_000
  assert proto.real_split.startswith('train')


def test_stylegan_v_counts():
  proto = protocols.PROTOCOLS['stylegan_v_2048']
  assert (proto.num_generated, proto.num_real, proto.num_frames) == (
      2048, 2048, 16)
  assert proto.resolution is None  # The dataset's own resolution.


@pytest.mark.parametrize('name,cites', [
    ('bair_vdm', ('Ho et al. 2022', 'Table 2')),
    ('kinetics600_vdm', ('Ho et al. 2022', 'Table 3')),
    ('ucf101_magvit', ('Yu et al. 2023', 'Table 10')),
    ('stylegan_v_2048', ('Skorokhodov et al. 2022', 'fvd2048_16f')),
])
def test_preset_names_its_source(name, cites):
  source = protocols.PROTOCOLS[name].source
  for cite in cites:
    assert cite in source, (name, source)


def test_presets_are_frozen_and_valid():
  for name, proto in protocols.PROTOCOLS.items():
    assert proto.resize in protocols.RESIZE_MODES, name
    assert proto.clip_start in protocols.CLIP_STARTS, name
    assert proto.feature in protocols.FEATURES, name
    assert 0 <= proto.conditioning_frames < proto.num_frames, name
    assert proto.num_generated % proto.folds == 0, name
    assert proto.num_real % proto.folds == 0, name
  with pytest.raises(dataclasses.FrozenInstanceError):
    protocols.PROTOCOLS['bair_vdm'].num_generated = 256
