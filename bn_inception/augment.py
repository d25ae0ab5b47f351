"""The photometric distortions, on the device, inside the jitted training step.

Both TFDS loaders deliver the undistorted training crop as uint8 pixels; the training step distorts
each example's colours here (`distort_colour`): brightness, saturation, hue and contrast in a
random order, TensorFlow's definitions (tf.image.adjust_*), strengths from `data_spec` scaled by
`config.dataset.distortion_strength`. Each example's draws come from the step's key folded with its
index in the global batch, so they are the same for both loaders and any number of devices or
processes, a resumed run draws what an uninterrupted one would, and the host spends nothing on them.
"""

import jax
import jax.numpy as jnp

from bn_inception import data_spec

# The distortions' key stream, apart from dropout's (both come from the train state's key).
_STREAM = 1


def _hv_range(image):
  """TensorFlow's AdjustHue decomposition of RGB pixels: hue in [0, 6), smallest and largest
  channel."""
  r, g, b = jnp.moveaxis(image, -1, 0)
  # The six orderings of (r, g, b), as TensorFlow tells them apart (ties go either way).
  r_lt_g = r < g
  category = jnp.where(r_lt_g, jnp.where(b < r, 1, jnp.where(b > g, 3, 2)),
                       jnp.where(b < g, 0, jnp.where(b > r, 4, 5)))
  v_max = jnp.maximum(jnp.maximum(r, g), b)
  v_min = jnp.minimum(jnp.minimum(r, g), b)
  v_mid = jnp.where(r_lt_g, jnp.where(b < r, r, jnp.where(b > g, g, b)),
                    jnp.where(b < g, g, jnp.where(b > r, r, b)))
  flat = v_max == v_min
  ratio = (v_mid - v_min) / jnp.where(flat, 1, v_max - v_min)
  hue = category + jnp.where(category % 2 == 0, ratio, 1 - ratio)
  return jnp.where(flat, 0, hue), v_min, v_max


def _from_hv_range(hue, v_min, v_max):
  category = hue.astype(jnp.int32)
  ratio = hue - category
  ratio = jnp.where(category % 2 == 0, ratio, 1 - ratio)
  v_mid = v_min + ratio * (v_max - v_min)
  # (r, g, b) of each category 0 ... 5 as (v_max, v_mid, v_min) picks: 0 max, 1 mid, 2 min.
  picks = ((0, 1, 2), (1, 0, 2), (2, 0, 1), (2, 1, 0), (1, 2, 0), (0, 2, 1))
  values = (v_max, v_mid, v_min)
  return jnp.stack([jnp.select([category == c for c in range(5)],
                               [values[p[channel]] for p in picks[:5]], values[picks[5][channel]])
                    for channel in range(3)], -1)


def _hsv(image):
  """TensorFlow's AdjustSaturation decomposition: hue in [0, 1], saturation, value."""
  r, g, b = jnp.moveaxis(image, -1, 0)
  value = jnp.maximum(jnp.maximum(r, g), b)
  chroma = value - jnp.minimum(jnp.minimum(r, g), b)
  saturation = jnp.where(value > 0, chroma / jnp.where(value > 0, value, 1), 0)
  norm = 1 / (6 * chroma)
  hue = jnp.where(r == value, norm * (g - b),
                  jnp.where(g == value, norm * (b - r) + 2 / 6, norm * (r - g) + 4 / 6))
  hue = jnp.where(chroma <= 0, 0, hue)
  return jnp.where(hue < 0, hue + 1, hue), saturation, value


def _from_hsv(hue, saturation, value):
  chroma = saturation * value
  low = value - chroma
  sector = hue * 6
  category = sector.astype(jnp.int32)  # 6 (a hue that rounded up to 1) is black, as in TensorFlow
  x = chroma * (1 - jnp.abs(sector - 2 * jnp.floor(sector / 2) - 1))
  zero = jnp.zeros_like(chroma)
  # (r, g, b) above `low` in each category 0 ... 5.
  table = ((chroma, x, zero), (x, chroma, zero), (zero, chroma, x), (zero, x, chroma),
           (x, zero, chroma), (chroma, zero, x))
  return jnp.stack([jnp.select([category == c for c in range(6)],
                               [row[channel] for row in table], zero) + low
                    for channel in range(3)], -1)


# TensorFlow's colour adjustments (tf.image.adjust_*) of a float RGB image [H, W, 3], any values.

def adjust_brightness(image, delta):
  return image + delta


def adjust_saturation(image, factor):
  """HSV's saturation scaled and clipped to [0, 1]."""
  hue, saturation, value = _hsv(image)
  return _from_hsv(hue, jnp.clip(saturation * factor, 0, 1), value)


def adjust_hue(image, delta):
  """The hue turned by delta (a fraction of the circle), each pixel's largest and smallest channel
  kept."""
  hue, v_min, v_max = _hv_range(image)
  hue = hue + delta * 6
  hue = jnp.where(hue < 0, hue + 6, jnp.where(hue >= 6, hue - 6, hue))
  return _from_hv_range(hue, v_min, v_max)


def adjust_contrast(image, factor):
  """Each channel scaled about its mean over the image."""
  mean = image.mean((-3, -2), keepdims=True)
  return (image - mean) * factor + mean


ADJUSTMENTS = (adjust_brightness, adjust_saturation, adjust_hue, adjust_contrast)


def draw(key, strength: float):
  """One example's distortion: the adjustments' amounts [4] (in ADJUSTMENTS' order, uniform in
  +- data_spec's maxima x strength: a delta for brightness and hue, 1 + that for saturation and
  contrast) and their order, a random permutation of 0 ... 3."""
  amount_key, order_key = jax.random.split(key)
  maxima = jnp.array([data_spec.MAX_BRIGHTNESS_DELTA, data_spec.MAX_SATURATION_FACTOR,
                      data_spec.MAX_HUE_DELTA, data_spec.MAX_CONTRAST_FACTOR]) * strength
  amounts = jax.random.uniform(amount_key, (4,), minval=-1, maxval=1) * maxima
  amounts += jnp.array([0.0, 1.0, 0.0, 1.0])
  return amounts, jax.random.permutation(order_key, 4)


def distort_image(image, amounts, order):
  """The adjustments of a float image [H, W, 3] in [0, 1] applied in `order`, unclipped in between
  (as TensorFlow's Inception preprocessing applies them), the result clipped to [0, 1]."""
  branches = [lambda x, amount, adjust=adjust: adjust(x, amount) for adjust in ADJUSTMENTS]

  def apply(position, x):  # one loop body of 4 branches compiles smaller than 4 x 4 inline
    return jax.lax.switch(order[position], branches, x, amounts[order[position]])

  return jnp.clip(jax.lax.fori_loop(0, len(ADJUSTMENTS), apply, image), 0, 1)


def example_keys(rng, step, batch_size: int):
  """The distortions' key of each example of the global batch at `step`: the step's key folded
  with the example's index."""
  step_key = jax.random.fold_in(jax.random.fold_in(rng, _STREAM), step)
  return jax.vmap(lambda index: jax.random.fold_in(step_key, index))(jnp.arange(batch_size))


def distort_colour(pixels, keys, strength: float):
  """uint8 pixels [B, H, W, 3] -> float32 [B, H, W, 3] in [0, 1], each example distorted with its
  key of `keys` [B]."""
  if pixels.dtype != jnp.uint8:
    raise TypeError(f'The colour distortions take uint8 pixels, not {pixels.dtype} images.')
  amounts, order = jax.vmap(lambda key: draw(key, strength))(keys)
  return jax.vmap(distort_image)(pixels.astype(jnp.float32) / 255, amounts, order)
