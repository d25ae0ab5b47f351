"""The colour distortions on the device (bn_inception/augment.py): TensorFlow's definitions, their
random amounts and order, per-example keys that do not depend on the devices, and the training
step that applies them only where the data set's batches are distorted."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_inception import augment
from bn_inception import data_spec
from bn_inception import train
from configs import default

# A few float32 ulps on [0, 1]: XLA and TensorFlow's kernels round some steps differently.
ULPS = 1e-6


def _image(shape=(12, 12, 3)):
  """Random colours beyond [0, 1] too (the distortions do not clip in between), with greys and
  ties between channels, which decide the hue's branches."""
  image = np.random.default_rng(0).uniform(-0.2, 1.2, shape).astype(np.float32)
  image[0, :5] = [[0.5, 0.5, 0.5], [0.2, 0.2, 0.7], [0.7, 0.2, 0.2], [0.3, 0.7, 0.7], [0, 0, 0]]
  return image


def test_adjustments_are_tensorflows():
  tf = pytest.importorskip('tensorflow')
  image = _image()
  cases = [('brightness', -0.1), ('brightness', 0.12)]
  cases += [(name, factor) for name in ('saturation', 'contrast') for factor in (0.0, 0.5, 1.4)]
  cases += [('hue', delta) for delta in (-0.2, 0.0, 0.13, 0.5)]
  for name, amount in cases:
    ours = jax.jit(getattr(augment, f'adjust_{name}'))(jnp.asarray(image), amount)
    theirs = getattr(tf.image, f'adjust_{name}')(image, amount).numpy()
    np.testing.assert_allclose(ours, theirs, atol=ULPS, err_msg=f'{name} {amount}')


def test_a_distortion_is_tensorflows_adjustments_in_its_order():
  tf = pytest.importorskip('tensorflow')
  image = np.clip(_image(), 0, 1)
  tf_adjust = (tf.image.adjust_brightness, tf.image.adjust_saturation, tf.image.adjust_hue,
               tf.image.adjust_contrast)
  distort = jax.jit(augment.distort_image)
  keys = jax.random.split(jax.random.PRNGKey(1), 6)
  for key in keys:
    amounts, order = augment.draw(key, 1.0)
    expected = image
    for position in np.asarray(order):
      expected = tf_adjust[position](expected, float(amounts[position]))
    expected = tf.clip_by_value(expected, 0, 1).numpy()
    np.testing.assert_allclose(distort(image, amounts, order), expected, atol=ULPS)


def test_amounts_and_orders_are_drawn_as_tensorflows_preprocessing_draws_them():
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  for strength in (1.0, 0.5):
    amounts, orders = jax.vmap(lambda key, s=strength: augment.draw(key, s))(keys)
    amounts, orders = np.asarray(amounts), np.asarray(orders)
    maxima = np.array([data_spec.MAX_BRIGHTNESS_DELTA, data_spec.MAX_SATURATION_FACTOR,
                       data_spec.MAX_HUE_DELTA, data_spec.MAX_CONTRAST_FACTOR]) * strength
    deviation = np.abs(amounts - [0, 1, 0, 1])  # deltas about 0, factors about 1
    assert (deviation <= maxima).all()
    # Uniform over +- the maximum: a mean |deviation| of half the maximum.
    np.testing.assert_allclose(deviation.mean(0), maxima / 2, rtol=0.06)
    counts = {tuple(order): 0 for order in itertools.permutations(range(4))}
    for order in orders:
      counts[tuple(order)] += 1
    assert min(counts.values()) > 2000 / 24 / 2  # every order, about equally often


def test_distortions_move_colours_within_range_and_scale_with_strength():
  """Modified BN-Inception distorts less (paper section 4.2.1, change 7): strength 0.5 changes the
  pixels about half as much as 1.0."""
  y, x = np.mgrid[0:16, 0:16]
  colourful = np.stack([x * 15, y * 15, np.full_like(x, 100)], -1).astype(np.uint8)
  pixels = np.repeat(colourful[None], 64, axis=0)
  keys = augment.example_keys(jax.random.PRNGKey(0), 7, len(pixels))
  distort = jax.jit(augment.distort_colour, static_argnums=2)
  original = pixels / 255
  changes = {}
  for strength in (0.5, 1.0):
    distorted = np.asarray(distort(pixels, keys, strength))
    assert distorted.dtype == np.float32 and distorted.min() >= 0 and distorted.max() <= 1
    changes[strength] = np.abs(distorted - original).mean()
    np.testing.assert_array_equal(distort(pixels, keys, strength), distorted)  # keyed: repeatable
  assert changes[1.0] > 0.03  # brightness and friends move the colour
  assert 0.35 < changes[0.5] / changes[1.0] < 0.7, changes
  with pytest.raises(TypeError, match='uint8'):
    augment.distort_colour(original, keys, 1.0)


def test_examples_draw_from_their_index_not_from_the_devices():
  pixels = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  keys = augment.example_keys(jax.random.PRNGKey(3), 5, len(pixels))
  whole = np.asarray(jax.jit(augment.distort_colour, static_argnums=2)(pixels, keys, 1.0))
  # Sharded over the 8 devices, as the training step's batch is.
  mesh = train.make_mesh()
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  sharded = jax.jit(lambda p, k: augment.distort_colour(p, k, 1.0), in_shardings=sharding)(
      pixels, keys)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(sharded), whole)
  # Example i's distortion is its own: drawn from its own key, the same alone as within the batch,
  # new at another step.
  amounts, _ = jax.vmap(lambda key: augment.draw(key, 1.0))(keys)
  assert len(np.unique(np.asarray(amounts)[:, 0])) == len(pixels)
  alone = augment.distort_colour(pixels[5:6], keys[5:6], 1.0)
  np.testing.assert_allclose(alone[0], whole[5], atol=ULPS)
  other_step = augment.example_keys(jax.random.PRNGKey(3), 6, len(pixels))
  assert not np.array_equal(augment.distort_colour(pixels, other_step, 1.0), whole)


def test_the_step_distorts_only_where_the_data_set_is_distorted(monkeypatch):
  calls = []
  real = augment.distort_colour
  monkeypatch.setattr(augment, 'distort_colour',
                      lambda *args: calls.append(args[2]) or real(*args))
  config = default.get_config('digits')
  config.model.width, config.dataset.image_size, config.batch_size = 0.125, 32, 8
  config.model.bn_group_size = 8
  for name, strength, dtype, expected in (('digits', 1.0, np.float32, []),
                                          ('imagenet2012', 0.0, np.uint8, []),
                                          ('imagenet2012', 0.5, np.uint8, [0.5])):
    config.dataset.name, config.dataset.distortion_strength = name, strength
    program = train.setup(config, 1000, train.make_mesh())
    batch = {'image': np.zeros((8, 32, 32, 3), dtype), 'label': np.zeros(8, np.int32)}
    calls.clear()
    # Traced: what it calls is what it compiles.
    program.train_step.lower(program.abstract_state, batch, program.hyperparameters)
    assert calls == expected, (name, strength)
