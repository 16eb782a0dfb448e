"""Prepares a TFDS video dataset for vdm_jax (run once, on your machine).

  python -m vdm_jax.data.prepare ucf101 --data_dir=~/tensorflow_datasets
  python -m vdm_jax.data.prepare bair_robot_pushing_small --data_dir=DIR
  python -m vdm_jax.data.prepare moving_mnist --data_dir=DIR
  python -m vdm_jax.data.prepare NAME[/CONFIG] --data_dir=DIR

Downloads the dataset and writes ArrayRecord files (random access, which the
sources in data/tfds_sources.py need). A dataset already prepared as
TFRecord files is converted instead (needs apache-beam, as `tfds
convert_format` does). Then train with `--config.data.data_dir=DIR`.

Downloads: UCF101 6.5 GB (storage.googleapis.com, plus the split lists from
crcv.ucf.edu), BAIR robot pushing 30 GB (rail.eecs.berkeley.edu), Moving
MNIST 800 MB (cs.toronto.edu). Datasets that need a manual download say
where to put the files; pass that folder with --manual_dir.
"""

import argparse
import os
import sys
from typing import Optional, Sequence

import tensorflow_datasets as tfds

from vdm_jax.data import tfds_sources

_HINTS = {
    'ucf101': (
        'If the UCF101 download keeps failing (the crcv.ucf.edu server is '
        'often slow or refuses connections), download UCF101.rar from '
        'https://www.crcv.ucf.edu/data/UCF101.php by hand, extract it, and '
        "train on the folder instead: --config.data.name=video_files "
        '--config.data.path=/path/to/UCF-101 (classes from the sub-folder '
        'names; all 13,320 videos, i.e. train+test).'),
    'bair_robot_pushing_small': (
        'The 30 GB tar comes from rail.eecs.berkeley.edu; rerun to retry '
        '(completed downloads are kept in the download directory).'),
}


def _tfds_name(name: str) -> str:
  spec = tfds_sources.DATASETS.get(name)
  return spec.tfds_name if spec else name


def _convert_to_array_record(builder) -> None:
  """Adds ArrayRecord shards beside a dataset prepared as TFRecord."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from tensorflow_datasets.scripts.cli import convert_format_utils
  except ImportError as e:
    raise SystemExit(
        f'{builder.name} is prepared in {builder.data_dir} as TFRecord files, '
        'which have no random access. Converting them needs apache-beam '
        f'({e}): pip install apache-beam and rerun this command; or prepare '
        'again into a new folder from the downloads already there:\n  python '
        f'-m vdm_jax.data.prepare {builder.name} --data_dir=NEW_DIR '
        f'--download_dir={os.path.join(builder.data_dir_root, "downloads")}'
    ) from e
  convert_format_utils.convert_dataset(
      out_dir=None, out_file_format='array_record',
      dataset_version_dir=str(builder.data_dir), num_workers=1)


def prepare(name: str, data_dir: Optional[str] = None,
            download_dir: Optional[str] = None,
            manual_dir: Optional[str] = None) -> str:
  """Downloads and prepares `name` as ArrayRecord files.

  Args:
    name: a preset (ucf101, bair_robot_pushing_small, moving_mnist) or any
      TFDS name, optionally 'name/config:version'.
    data_dir: TFDS data directory (None: the TFDS default).
    download_dir: where downloads go (default DATA_DIR/downloads).
    manual_dir: folder with manually downloaded files, for datasets that
      need them.

  Returns:
    The prepared dataset's directory.
  """
  tfds_name = _tfds_name(name)
  builder = tfds.builder(tfds_name, data_dir=data_dir)
  if builder.is_prepared():
    formats = builder.info.available_file_formats()
    if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
      _convert_to_array_record(builder)
    print(f'{tfds_name} is ready in {builder.data_dir}.')
    return str(builder.data_dir)
  builder = tfds.builder(tfds_name, data_dir=data_dir,
                         file_format='array_record')
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_dir=download_dir,
                                 download_config=config)
  except Exception as e:  # pylint: disable=broad-except
    message = str(e).strip().splitlines()
    hint = _HINTS.get(name.split('/')[0], '')
    manual = builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    if manual:
      hint = (f'{name} needs a manual download:\n{manual.strip()}\nPut the '
              'files in a folder and rerun with --manual_dir=FOLDER. ' + hint)
    raise SystemExit(
        f'Preparing {tfds_name} failed: {type(e).__name__}: '
        f'{message[0] if message else ""}\n{hint}'.rstrip()) from e
  print(f'{tfds_name} is ready in {builder.data_dir}; train with '
        f'--config.data.data_dir={builder.data_dir_root}')
  return str(builder.data_dir)


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m vdm_jax.data.prepare',
      description='Download and prepare a TFDS video dataset as ArrayRecord.')
  parser.add_argument(
      'name', help='ucf101 | bair_robot_pushing_small | moving_mnist | any '
      'TFDS name (name/config:version)')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data directory (default: TFDS\'s)')
  parser.add_argument('--download_dir', default=None,
                      help='download directory (default DATA_DIR/downloads)')
  parser.add_argument('--manual_dir', default=None,
                      help='folder with manually downloaded files')
  args = parser.parse_args(argv)
  expand = lambda p: os.path.expanduser(p) if p else p
  prepare(args.name, expand(args.data_dir), expand(args.download_dir),
          expand(args.manual_dir))


if __name__ == '__main__':
  main(sys.argv[1:])
