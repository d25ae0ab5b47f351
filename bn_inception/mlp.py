"""The paper's Figure 1 experiment (section 4.1) on digits: a sigmoid MLP with and without BN.

The paper trains a 3-hidden-layer network (100 sigmoid units each, a 10-way softmax, small Gaussian
initial weights) on binary 28 x 28 MNIST, 60 examples per step for 50,000 steps, and plots (a) test
accuracy against steps and (b, c) the 15th/50th/85th percentiles of one last-hidden-layer sigmoid
input over training: without BN they drift, with BN they stay put.

MNIST needs a download, so this runs on scikit-learn's digits instead: 8 x 8 images binarised at
half intensity (64 binary inputs), the same 1,437/360 split as the CNN runs. The paper gives neither
the optimiser nor the initial scale: ours are plain SGD at LEARNING_RATE and N(0, INIT_STD^2)
weights, the same for both networks. BN sits between each hidden layer's matmul and its sigmoid (no
bias there: BN's beta replaces it), one statistic over the 60-example batch (layers.BatchNorm,
group_size None); evaluation uses its running averages.

This is a different experiment from the CNN runs, so it has its own few-line loop: the whole
training run is one jitted `lax.scan`, seconds on a CPU.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bn_inception import input_pipeline
from bn_inception import layers

HIDDEN = (100, 100, 100)
BATCH = 60
LEARNING_RATE = 0.5  # ours: the paper does not say
INIT_STD = 0.1  # "small random Gaussian values"; the scale is ours
PERCENTILES = (15, 50, 85)
UNIT = 0  # the last-hidden-layer unit whose sigmoid input is followed (any one is typical)


class MLP(nn.Module):
  use_bn: bool

  @nn.compact
  def __call__(self, x, train: bool):
    """(logits, the last hidden layer's sigmoid inputs)."""
    init = nn.initializers.normal(INIT_STD)
    for width in HIDDEN:
      x = nn.Dense(width, use_bias=not self.use_bn, kernel_init=init)(x)
      if self.use_bn:
        x = layers.BatchNorm(group_size=None)(x, train)
      sigmoid_input = x
      x = nn.sigmoid(x)
    return nn.Dense(10, kernel_init=init)(x), sigmoid_input


class Curves(NamedTuple):
  steps: np.ndarray  # [E] the steps at which the test set was evaluated (0 included)
  test_accuracy: np.ndarray  # [E]
  sigmoid_input: np.ndarray  # [E, 3]: PERCENTILES of one last-hidden-layer unit over the test set


def digits_binary() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(train images [1437, 64], train labels, test images [360, 64], test labels), pixels 0/1."""
  # 8 x 8 is the data's own size, so this is the raw data in [-1, 1]; > 0 is above half intensity.
  images, labels, train, test = input_pipeline._digits(8)  # pylint: disable=protected-access
  binary = (images[..., 0].reshape(len(images), 64) > 0).astype(np.float32)
  return binary[train], labels[train], binary[test], labels[test]


def train_mlp(use_bn: bool, num_steps: int = 50_000, eval_every: int = 500, unit: int = UNIT,
              seed: int = 0) -> Curves:
  """Trains one network; evaluates on the test set every `eval_every` steps and at step 0."""
  x_train, y_train, x_test, y_test = (jnp.asarray(a) for a in digits_binary())
  model = MLP(use_bn)
  init_key, data_key = jax.random.split(jax.random.key(seed))
  variables = model.init(init_key, x_train[:BATCH], train=False)
  params, stats = variables['params'], variables.get('batch_stats', {})
  tx = optax.sgd(LEARNING_RATE)

  def loss_fn(params, stats, x, y):
    (logits, _), updates = model.apply({'params': params, 'batch_stats': stats}, x, train=True,
                                       mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

  def train_step(carry, key):
    params, stats, opt_state = carry
    # Uniformly sampled mini-batches of 60 (1,437 examples do not split into equal epochs).
    idx = jax.random.randint(key, (BATCH,), 0, x_train.shape[0])
    grads, updates = jax.grad(loss_fn, has_aux=True)(params, stats, x_train[idx], y_train[idx])
    param_updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(params, param_updates), updates.get('batch_stats', {}),
            opt_state), None

  def measure(params, stats):
    logits, sigmoid_input = model.apply({'params': params, 'batch_stats': stats}, x_test,
                                        train=False)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return accuracy, jnp.percentile(sigmoid_input[:, unit], jnp.array(PERCENTILES))

  def train_and_measure(carry, keys):
    carry, _ = jax.lax.scan(train_step, carry, keys)
    return carry, measure(*carry[:2])

  @jax.jit
  def run(params, stats):
    keys = jax.random.split(data_key, num_steps).reshape(num_steps // eval_every, eval_every)
    _, (accuracy, percentiles) = jax.lax.scan(
        train_and_measure, (params, stats, tx.init(params)), keys)
    first = measure(params, stats)
    return (jnp.concatenate([first[0][None], accuracy]),
            jnp.concatenate([first[1][None], percentiles]))

  if num_steps % eval_every:
    raise ValueError(f'num_steps {num_steps} is not a multiple of eval_every {eval_every}.')
  accuracy, percentiles = jax.device_get(run(params, stats))
  return Curves(np.arange(0, num_steps + 1, eval_every), accuracy, percentiles)
