"""Evaluation sets: ImageNet-ReaL and ImageNet-V2 through TFDS's own builders, and the ReaL rule.

The fixtures are tiny files in each builder's own layout, placed in manual_dir under their published
names, as a user places the real ones:
- ReaL: the published real.json itself (timm's wheel ships it byte-identical, so TFDS's registered
  checksum verifies it as it would the download) with a tiny ILSVRC2012_img_val.tar of the first 12
  validation images (the builder labels the images it finds; real.json covers all 50,000).
- ImageNet-V2: a tiny imagenetv2-matched-frequency.tar.gz in the published layout
  (imagenetv2-matched-frequency-format-val/<class>/<name>.jpeg). TFDS's registered checksum is
  that of the 1.2 GiB archive, so the test registers the tiny archive's own size and checksum for
  the builder's URL (computed by TFDS) in place of it; a test below shows the registered one
  refusing the tiny file.
Scores are checked against sums worked out by hand on constructed predictions.
"""

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_inception import convert
from bn_inception import ensemble
from bn_inception import errors
from bn_inception import evaluate
from bn_inception import imagenet_archives
from bn_inception import input_pipeline
from bn_inception import models
from bn_inception import predictions
from bn_inception.predictions import Predictions
from configs import bn_x30
import imagenet_fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = 'imagenet_v2/matched-frequency'
V2_ARCHIVE = 'imagenetv2-matched-frequency.tar.gz'
V2_IMAGES = {'0': 2, '7': 1, '999': 2}  # class directory -> images in it


def published_real_json() -> str:
  """timm's copy of real.json (a test-only dependency, installed with --no-deps)."""
  spec = importlib.util.find_spec('timm')
  path = spec and os.path.join(spec.submodule_search_locations[0], 'data', '_info',
                               'imagenet_real_labels.json')
  if not path or not os.path.exists(path):
    message = 'timm (pip install --no-deps timm==1.0.31) ships the published real.json'
    if os.environ.get('BN_INCEPTION_REQUIRE_TORCH') == '1':
      pytest.fail(message, pytrace=False)
    pytest.skip(message)
  return path


def write_v2_archive(path: str) -> dict[str, int]:
  """The published layout in miniature; returns {file_name: label} as TFDS names the images."""
  rng = np.random.default_rng(1)
  labels = {}
  with tarfile.open(path, 'w:gz') as tar:
    for class_dir, count in V2_IMAGES.items():
      for i in range(count):
        name = f'{class_dir}/{"%040x" % rng.integers(2**62)}.jpeg'
        data = imagenet_fixture._encode(rng, 'rgb', None)  # pylint: disable=protected-access
        info = tarfile.TarInfo(f'imagenetv2-matched-frequency-format-val/{name}')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        labels[name] = int(class_dir)
  return labels


def own_checksum(monkeypatch, archive: str) -> None:
  """Registers the tiny archive's size and checksum for the imagenet_v2 builder's URL."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder_cls = tfds.builder_cls('imagenet_v2')
  url_infos = dict(builder_cls.url_infos)
  url = next(u for u, info in url_infos.items() if info.filename == V2_ARCHIVE)
  computed = tfds.core.download.checksums.compute_url_info(archive)
  url_infos[url] = tfds.core.download.checksums.UrlInfo(
      size=computed.size, checksum=computed.checksum, filename=V2_ARCHIVE)
  monkeypatch.setattr(builder_cls, 'url_infos', url_infos)


def random_checkpoint(workdir: str, config) -> None:
  """A step-0 checkpoint and config.json of config's network with random He-normal kernels, as
  the converter writes them (drawn with numpy: the network's own init runs op by op, for tens of
  seconds on a loaded CPU)."""
  model = models.from_config(config.model)
  size = config.dataset.image_size
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                             train=False))
  rng = np.random.default_rng(0)

  def value(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(leaf.shape[:-1])
      return (rng.normal(size=leaf.shape) * np.sqrt(2 / fan_in)).astype(leaf.dtype)
    return (np.ones if name in ('scale', 'var') else np.zeros)(leaf.shape, leaf.dtype)

  convert.save(workdir, config, jax.tree_util.tree_map_with_path(value, shapes))


@pytest.fixture(scope='module')
def sets(tmp_path_factory):
  """manual_dir with the three sets' files, prepared by the real builders, and a checkpoint of a
  tiny 1000-class network (random weights: the scores are checked against the probabilities)."""
  root = tmp_path_factory.mktemp('eval_sets')
  manual = root / 'manual'
  manifest = imagenet_fixture.write_archives(manual)
  shutil.copy(published_real_json(), manual / 'real.json')
  v2_labels = write_v2_archive(os.fspath(manual / V2_ARCHIVE))
  config = bn_x30.get_config()
  config.dataset.data_dir = os.fspath(root / 'data')
  config.dataset.manual_dir = os.fspath(manual)
  config.dataset.image_size = 32
  config.model.width = 0.125
  config.eval_batch_size = 8
  with pytest.MonkeyPatch.context() as monkeypatch:
    own_checksum(monkeypatch, os.fspath(manual / V2_ARCHIVE))
    for name in (predictions.REAL, V2):
      input_pipeline.get_info(evaluate.eval_set_config(config, name).dataset)
  workdir = os.fspath(root / 'run')
  random_checkpoint(workdir, config)
  with open(published_real_json()) as f:
    real_json = json.load(f)
  return dict(config=config, workdir=workdir, manifest=manifest, v2_labels=v2_labels,
              real_json=real_json, root=root)


@pytest.fixture(scope='module')
def evaluated(sets, request):
  """Both sets evaluated from one restore of the checkpoint (restores counted)."""
  restores = []
  original = evaluate.restore_variables

  def counting(*args, **kwargs):
    restores.append(args)
    return original(*args, **kwargs)

  with pytest.MonkeyPatch.context() as monkeypatch:
    monkeypatch.setattr(evaluate, 'restore_variables', counting)
    results = evaluate.evaluate_sets(sets['config'], sets['workdir'], [predictions.REAL, V2])
  assert len(restores) == 1
  return dict(zip(('real', 'v2'), results))


def test_real_holds_the_published_label_sets(sets, evaluated):
  real = evaluated['real']
  assert real.eval_set == predictions.REAL and real.meta['split'] == 'validation'
  ids = sorted(sets['manifest']['validation'])
  assert sorted(real.ids.tolist()) == ids
  # The label sets and original labels, from real.json and TFDS's validation labels directly.
  index = {name: int(name[15:23]) - 1 for name in ids}
  class_names = imagenet_archives.tfds_labels('labels.txt')
  for example_id, label, label_set in zip(real.ids, real.labels, real.real_labels):
    assert np.flatnonzero(label_set).tolist() == sorted(sets['real_json'][index[example_id]])
    synset = sets['manifest']['validation'][example_id]
    assert label == class_names.index(synset)
  assert not real.real_labels[real.ids.tolist().index('ILSVRC2012_val_00000001.JPEG')].any()
  acc = predictions.accuracy(real)
  assert (acc['real_examples'], acc['real_left_out']) == (11, 1)  # image 1's set is empty
  # Original labels and ReaL sets, scored by hand from the probabilities.
  top1 = np.argmax(real.probs, axis=1)
  assert acc['top1'] == np.mean(top1 == real.labels)
  labelled = real.real_labels.any(axis=1)
  assert acc['real_top1'] == np.mean(real.real_labels[np.arange(12), top1][labelled])
  assert len(set(top1)) > 1  # the random network does not predict one class everywhere


def test_v2_is_scored_against_its_own_labels(sets, evaluated):
  v2 = evaluated['v2']
  assert v2.eval_set == V2 and v2.meta['split'] == 'test' and v2.real_labels is None
  assert dict(zip(v2.ids.tolist(), v2.labels.tolist())) == sets['v2_labels']
  top1 = np.mean(np.argmax(v2.probs, axis=1) == np.array([sets['v2_labels'][i] for i in v2.ids]))
  assert predictions.accuracy(v2)['top1'] == top1


def test_real_rule_by_hand():
  """Six classes, five images, each probability row ranks the classes 0 > 1 > ... by position:
  row r lists (original label, ReaL set, the class ranked first, ... last)."""
  rankings = [
      # original 0, set {0}: ranked 1st -> top-1 on both.
      (0, {0}, [0, 1, 2, 3, 4, 5]),
      # original 1, set {1, 2}: 1 is 6th (wrong on the original labels, top-1 and top-5), 2 is
      # 1st: right on ReaL only.
      (1, {1, 2}, [2, 0, 3, 4, 5, 1]),
      # original 3, empty set: right on the original labels, left out of ReaL.
      (3, set(), [3, 0, 1, 2, 4, 5]),
      # original 4 ranked 1st; set {5} (ReaL disagrees), 5 is 3rd: ReaL top-5 only.
      (4, {5}, [4, 0, 5, 1, 2, 3]),
      # original 0 ranked 6th; set {0, 3}: 3 ranked 5th, 0 6th: ReaL top-5 only.
      (0, {0, 3}, [1, 2, 4, 5, 3, 0]),
  ]
  probs = np.zeros((5, 6), np.float32)
  for row, (_, _, order) in enumerate(rankings):
    probs[row, order] = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
  real = np.zeros((5, 6), bool)
  for row, (_, label_set, _) in enumerate(rankings):
    real[row, list(label_set)] = True
  p = Predictions(probs, np.array([r[0] for r in rankings]),
                  np.array([f'ILSVRC2012_val_{i:08d}.JPEG' for i in (3, 1, 5, 2, 4)]),
                  {'eval_set': predictions.REAL}, real)
  # Original: top-1 rows 0, 2, 3 -> 3/5; top-5 rows 0, 2, 3 (rows 1 and 4 rank it 6th) -> 3/5.
  # ReaL (rows 0, 1, 3, 4; row 2 left out): top-1 rows 0, 1 -> 2/4; top-5 all four -> 4/4.
  assert predictions.accuracy(p) == {'top1': 3 / 5, 'top5': 3 / 5, 'real_top1': 2 / 4,
                                     'real_top5': 4 / 4, 'real_examples': 4, 'real_left_out': 1}


def test_real_files_and_ensembles_keep_the_rule(tmp_path):
  """The label sets survive the file; an ensemble is scored by the ReaL rule without the data (its
  row has ReaL columns too); by hand: 2 images, 3 classes."""
  ids = np.array(['ILSVRC2012_val_00000002.JPEG', 'ILSVRC2012_val_00000007.JPEG'])
  real = np.array([[False, True, True], [True, False, False]])
  labels = np.array([1, 0])
  # Member a: row 0 -> class 2 (ReaL only), row 1 -> class 1 (wrong). Member b: row 0 -> class 0
  # (wrong), row 1 -> class 0 (right on both). Mean: row 0 [.35 .2 .45] -> 2; row 1 [.45 .5 .05]
  # -> 1.
  a = Predictions(np.array([[.1, .2, .7], [.2, .7, .1]], np.float32), labels, ids,
                  {'eval_set': predictions.REAL}, real)
  b = Predictions(np.array([[.6, .2, .2], [.7, .3, .0]], np.float32), labels, ids,
                  {'eval_set': predictions.REAL}, real)
  predictions.save(str(tmp_path / 'a.npz'), a)
  predictions.save(str(tmp_path / 'b.npz'), b.sorted_by_id())
  loaded = predictions.load(str(tmp_path / 'a.npz'))
  np.testing.assert_array_equal(loaded.real_labels, real)
  combined, rows = ensemble.ensemble_files([str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')],
                                           str(tmp_path / 'ens.npz'))
  top1 = {r['name']: (r['top1'], r['real_top1']) for r in rows}
  assert top1 == {'a.npz': (0, 1 / 2), 'b.npz': (1 / 2, 1 / 2), 'ensemble': (0, 1 / 2)}
  assert predictions.load(str(tmp_path / 'ens.npz')).eval_set == predictions.REAL
  table = ensemble.format_report(rows).splitlines()
  assert 'ReaL top-1' in table[0] and table[4].split()[0] == 'ensemble'
  assert table[4].split()[-2:] == ['50.00%', '100.00%']  # ReaL top-1, top-5 of the ensemble


def test_ids_that_are_not_real_images_are_refused(tmp_path):
  p = Predictions(np.full((3, 4), .25, np.float32), np.zeros(3, int),
                  np.array(['ILSVRC2012_val_00000001.JPEG', 'n01440764_1.JPEG',
                            'ILSVRC2012_val_00050001.JPEG']), {'eval_set': predictions.REAL},
                  np.ones((3, 4), bool))
  predictions.save(str(tmp_path / 'p.npz'), p)
  with pytest.raises(errors.InputFileError, match=r"p\.npz: example 1 has id 'n01440764_1\.JPEG'"):
    predictions.load(str(tmp_path / 'p.npz'))
  p.ids = p.ids[[0, 2, 0]]
  with pytest.raises(errors.InputFileError, match=r"example 1 has id 'ILSVRC2012_val_00050001"):
    predictions.check_real_ids(p.ids, 'p.npz')


def test_members_of_different_sets_are_refused():
  probs = np.full((2, 3), 1 / 3, np.float32)
  a = Predictions(probs, np.zeros(2, int), np.arange(2), {'eval_set': 'imagenet2012'})
  b = Predictions(probs, np.zeros(2, int), np.arange(2), {'eval_set': V2})
  with pytest.raises(errors.InputFileError, match=r'different evaluation sets: a: imagenet2012, '
                     r'b: imagenet_v2/matched-frequency'):
    ensemble.ensemble([a, b], ['a', 'b'])


@pytest.mark.parametrize('name, missing', [
    (predictions.REAL, ['real.json', 'raw.githubusercontent.com/google-research/reassessed']),
    ('imagenet_v2/topimages', ['imagenetv2-top-images.tar.gz', 'huggingface.co']),
])
def test_an_unprepared_set_says_how_to_prepare_it(tmp_path, name, missing):
  config = evaluate.eval_set_config(bn_x30.get_config(), name).dataset
  config.data_dir = os.fspath(tmp_path / 'data')
  config.manual_dir = os.fspath(tmp_path)
  with pytest.raises(errors.NotFoundError) as error:
    input_pipeline.get_info(config)
  for words in [f'{name} is not prepared', f'manual_dir={tmp_path} lacks', *missing,
                '--config.dataset.manual_dir=DIR']:
    assert words in str(error.value)
  with pytest.raises(errors.ConfigError, match=r"Unknown evaluation set 'imagenet_v3'; valid: "):
    evaluate.eval_set_config(bn_x30.get_config(), 'imagenet_v3')


def test_the_files_named_are_those_tfds_looks_for():
  """The names the message asks for are the ones TFDS's builders registered (it finds them in
  manual_dir by these names)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  for name, files in tfds_pipeline.EVAL_SET_FILES.items():
    registered = {info.filename: url for url, info in
                  tfds.builder_cls(name.split('/')[0]).url_infos.items()}
    for file_name, source, _ in files:
      if file_name != 'ILSVRC2012_img_val.tar':  # read from manual_dir by the builder itself
        assert registered[file_name] == source


def test_a_wrong_file_is_refused_by_its_registered_checksum(tmp_path):
  """The tiny archive under the published name, without the test's own checksum: refused."""
  write_v2_archive(os.fspath(tmp_path / V2_ARCHIVE))
  config = evaluate.eval_set_config(bn_x30.get_config(), V2).dataset
  config.data_dir = os.fspath(tmp_path / 'data')
  config.manual_dir = os.fspath(tmp_path)
  with pytest.raises(errors.InputFileError,
                     match=f'{tmp_path / V2_ARCHIVE} is not the file {V2} is prepared from'):
    input_pipeline.get_info(config)


def test_command_line_evaluates_several_sets(sets, evaluated, tmp_path):
  """`--eval_sets=A,B --output=DIR/{eval_set}.npz`: a line and a file per set, and the table."""
  output = tmp_path / 'out' / '{eval_set}_{step}.npz'
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.evaluate', f'--workdir={sets["workdir"]}',
       f'--eval_sets={predictions.REAL},{V2}', f'--output={output}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  real_acc = predictions.accuracy(evaluated['real'])
  assert (f'ReaL top-1 {predictions.percent(real_acc["real_top1"])}, top-5 '
          f'{predictions.percent(real_acc["real_top5"])} over the 11 images with ReaL labels (1 '
          'left out') in result.stdout
  assert 'ReaL top-1' in result.stdout.splitlines()[-4]  # the table's header
  for name, expected in ((predictions.REAL, evaluated['real']), (V2, evaluated['v2'])):
    written = predictions.load(str(tmp_path / 'out' / f'{name.replace("/", "_")}_0.npz'))
    assert written.eval_set == name
    np.testing.assert_allclose(written.sorted_by_id().probs, expected.sorted_by_id().probs,
                               atol=1e-6)


def test_report_has_a_row_per_set_and_the_paper_beside_the_original_labels_only(tmp_path):
  from bn_inception import report  # pylint: disable=g-import-not-at-top
  ids = np.array(['ILSVRC2012_val_00000001.JPEG', 'ILSVRC2012_val_00000002.JPEG'])
  probs = np.array([[.7, .2, .1], [.1, .2, .7]], np.float32)
  for name, real in (('imagenet2012', None), (predictions.REAL, np.array([[0, 0, 0], [0, 0, 1]],
                                                                         bool))):
    predictions.save(str(tmp_path / f'{name}.npz'), Predictions(
        probs, np.array([0, 1]), ids, {'eval_set': name, 'crops': 'center', 'step': 9}, real))
  original, real = report.evaluations_table(
      [str(tmp_path / 'imagenet2012.npz'), str(tmp_path / f'{predictions.REAL}.npz')])[2:]
  # Original: image 0 right, image 1 wrong (top-1 50%). ReaL: image 0 left out, image 1 right.
  assert original.split(' | ')[1:] == ['imagenet2012', '9', 'center', '1', '50.0%', '100.0%',
                                       '–', '–', '74.8%', '92.2% |']
  assert real.split(' | ')[1:] == [predictions.REAL, '9', 'center', '1', '50.0%', '100.0%',
                                   '100.0%', '100.0% (1 left out)', '–', '– |']
