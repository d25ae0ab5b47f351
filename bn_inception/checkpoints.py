"""Orbax checkpoints of a run's workdir: `WORKDIR/checkpoints/<step>/state` plus `WORKDIR/config.json`.

Orbax writes every checkpoint into a temporary directory and renames it when complete, so a crash
mid-write never touches the last good one; an incomplete or unreadable newest checkpoint is skipped
in favour of the previous one, with a warning.
"""

import json
import os
import time
from typing import Any, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

ITEM = 'state'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, *, keep: int = 3, keep_every: int = 0,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every or None, create=not read_only,
      read_only=read_only, enable_async_checkpointing=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers={ITEM: ocp.StandardCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  mngr.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)}), force=True)


def restore_latest(mngr: ocp.CheckpointManager, target: Any = None,
                   step: Optional[int] = None, *,
                   only: Optional[Sequence[str]] = None,
                   set_aside_unreadable: bool = False) -> tuple[Optional[int], Any]:
  """Restores `step` (default: the newest that reads back), into the structure of `target`.

  Returns (step, state), or (None, None) when the directory holds no checkpoint. A newest checkpoint
  that cannot be read is skipped with a warning (and, with `set_aside_unreadable`, renamed to
  `<step>.unreadable.<time>` so that training can write that step again); a checkpoint whose
  parameters differ from `target`'s (another model's workdir) is a clear error. With `only` (names
  of the state's entries, e.g. ('params', 'batch_stats')), the state is a dict of just those, as
  numpy arrays, whatever the devices it was saved from; the other entries are not read, and names
  the checkpoint lacks (or holds as None) map to None.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise FileNotFoundError(
          f'No checkpoint for step {step} in {mngr.directory}; available: {sorted(steps)}.')
    steps = [step]
  restore_args = (ocp.args.StandardRestore(target) if target is not None
                  else ocp.args.StandardRestore())
  for i, s in enumerate(steps):
    try:
      if target is not None:
        check_fits(mngr.item_metadata(s)[ITEM].tree, target, s, mngr.directory)
      if only is not None:
        restored = {ITEM: _restore_only(mngr, s, only)}
      else:
        restored = mngr.restore(s, args=ocp.args.Composite(**{ITEM: restore_args}))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      fallback = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) else 'none is older'
      logging.warning('Checkpoint %d in %s could not be read (%s: %s); %s.', s, mngr.directory,
                      type(e).__name__, e, fallback)
      if set_aside_unreadable:
        set_aside(mngr, s)
    else:
      return s, restored[ITEM]
  if steps:
    raise RuntimeError(f'No checkpoint in {mngr.directory} could be read (tried steps {steps}).')
  return None, None


def set_aside(mngr: ocp.CheckpointManager, step: int) -> None:
  """Renames an unreadable checkpoint out of Orbax's way, keeping it for inspection."""
  path = os.path.join(str(mngr.directory), str(step))
  if jax.process_index() == 0 and os.path.isdir(path):
    os.replace(path, f'{path}.unreadable.{int(time.time())}')
  mngr.reload()


def _restore_only(mngr: ocp.CheckpointManager, step: int, names: Sequence[str]) -> dict[str, Any]:
  # A PyTree handler on the item's directory: the manager's StandardRestore cannot restore part of
  # a tree, and the saved metadata gives the structure without knowing the model.
  path = mngr.directory / str(step) / ITEM
  handler = ocp.PyTreeCheckpointHandler()
  try:
    saved = handler.metadata(path).tree
    item = {name: saved[name] for name in names if saved.get(name) is not None}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = handler.restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=as_numpy, partial_restore=True))
  finally:
    handler.close()
  return {name: restored.get(name) for name in names}


class CheckpointMismatchError(ValueError):
  pass


def check_fits(stored, target, step: int, directory) -> None:
  """Refuses a readable checkpoint whose arrays are not the target's (names and shapes), so that a
  good checkpoint of another model or setting is never mistaken for an unreadable one."""
  shapes = lambda tree: {jax.tree_util.keystr(path, simple=True, separator='/'): tuple(x.shape)
                         for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  stored, expected = shapes(stored), shapes(target)
  if stored != expected:
    differ = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
    hint = ('; a PRNG key of another shape: was the run started with another JAX_DEFAULT_PRNG_IMPL '
            '(make demo uses rbg)?' if 'rng' in differ else '')
    raise CheckpointMismatchError(
        f'The checkpoint at step {step} in {directory} does not fit this model: '
        f'{len(differ)} array(s) differ in name or shape, e.g. '
        + ', '.join(f'{k}: {stored.get(k)} stored, {expected.get(k)} expected' for k in differ[:3])
        + hint + '. Is this workdir another run\'s (a different variant, width, num_classes or '
        'ema_decay)? Use a new --workdir, or the config the run was started with.')


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (atomically), warning about fields that differ from an existing one."""
  path = os.path.join(workdir, 'config.json')
  new = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    changed = diff(old, new)
    if changed:
      logging.warning('Resuming %s with a config that differs from the saved one in: %s',
                      workdir, '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items()))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} a bn_inception workdir?')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def diff(old: dict, new: dict, prefix: str = '') -> dict[str, tuple[Any, Any]]:
  """Fields whose values differ between two nested dicts, as {'a.b': (old, new)}."""
  out = {}
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key), new.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out.update(diff(a, b, f'{prefix}{key}.'))
    elif a != b:
      out[prefix + key] = (a, b)
  return out
