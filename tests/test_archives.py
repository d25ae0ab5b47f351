"""ImageNet archives in manual_dir that are not what image-net.org ships (the classic failed
download: an HTML login page saved under the archive's name; an empty tar) are refused through the
real entry point with one line naming the archive, before TFDS's builder reads them."""

import os
import subprocess
import sys
import tarfile

import pytest

from imagenet_fixture import write_archives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIN_PAGE = b'<!DOCTYPE html>\n<html><head><title>ImageNet Login</title></head></html>\n'


def write_login_page(path):
  with open(path, 'wb') as f:
    f.write(LOGIN_PAGE)


def write_empty_tar(path):
  with tarfile.open(path, 'w'):
    pass


@pytest.mark.parametrize('archive, replace, problem', [
    ('ILSVRC2012_img_train.tar', write_login_page, 'not a tar file'),
    ('ILSVRC2012_img_val.tar', write_empty_tar, 'an empty tar'),
])
def test_an_archive_that_is_not_a_tar_of_images_is_refused_in_one_line(tmp_path, archive,
                                                                       replace, problem):
  manual_dir = tmp_path / 'manual'
  write_archives(manual_dir)
  path = manual_dir / archive
  replace(path)
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.main', '--config=configs/bn_x30.py',
       f'--workdir={workdir}', f'--config.dataset.manual_dir={manual_dir}',
       f'--config.dataset.data_dir={tmp_path / "data"}', '--config.dataset.image_size=32',
       '--config.model.width=0.125', '--config.batch_size=32', '--config.num_train_steps=1'],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
  assert len(errors) == 1, result.stderr
  message = errors[0]
  assert f'{path} is not a tar of' in message and f'({problem}; ' in message, message
  assert f'{os.path.getsize(path)} bytes' in message, message
  assert 'Download it again' in message, message
  if replace is write_login_page:
    assert repr(LOGIN_PAGE[:32]) in message, message
  assert not workdir.exists()
