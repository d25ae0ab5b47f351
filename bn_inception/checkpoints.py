"""Orbax checkpoints of a run's workdir: `WORKDIR/checkpoints/<step>/state` plus `WORKDIR/config.json`.

Orbax writes every checkpoint into a temporary directory and renames it when complete, so a crash
mid-write never touches the last good one; an unreadable newest checkpoint is skipped in favour of
the previous one, with one warning. A training run resumes only from a checkpoint that fits it, and
never starts again from step 0 when checkpoints exist but none can be read (`resume`).
"""

import asyncio
import contextlib
import errno
import glob
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from bn_inception import errors
from bn_inception import run_dir
from bn_inception.run_dir import read_config

ITEM = 'state'
UNREADABLE = '.unreadable.'  # a set-aside checkpoint: STEP.unreadable.TIME


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def manager(workdir: str, *, keep: int = 3, keep_every: int = 0,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax's manager of WORKDIR/checkpoints: a writer (training's), or with `read_only` a reader,
  which saves and deletes nothing.

  A writer first removes the temporary directories of saves that never finished (a second Ctrl-C,
  a killed process), naming them. Orbax announces a reader with the warning "Given directory is
  read only", which describes the manager, not the directory, and so is not shown.
  """
  directory = checkpoint_dir(workdir)
  if not read_only:
    log_unfinished_saves(directory)
  options = ocp.CheckpointManagerOptions(  # read-only: nothing to keep or save (Orbax warns else)
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      keep_period=keep_every or None, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only, cleanup_tmp_directories=not read_only)
  with _hidden_warning('Given directory is read only'):
    return (ocp.CheckpointManager if read_only else _Writer)(
        directory, options=options, item_handlers={ITEM: ocp.StandardCheckpointHandler()})


class _Writer(ocp.CheckpointManager):
  """Orbax's manager, whose saves that fail for a full disk end in one DiskFullError.

  Orbax writes a checkpoint in the background: a failed write surfaces at the next save or when
  waiting for the last one, each of its writers logging its own traceback, and each write still in
  flight reporting through sys.unraisablehook that its event loop, closed at the first failure, is
  gone: hundreds of lines. The logs are dropped for a full disk, which the DiskFullError explains,
  and the reports of a closed loop from then on in this process (they only follow another error,
  and may come after the manager closed).
  """

  def __init__(self, directory, options: ocp.CheckpointManagerOptions, **kwargs):
    super().__init__(directory, options=options, **kwargs)
    self.keep = options.max_to_keep
    self.saving = None  # the step of the save last started
    self._quiet = lambda record: not (record.levelno >= std_logging.ERROR and _is_disk_full(record))
    logging.get_absl_logger().addFilter(self._quiet)
    _ignore_reports_of_closed_loops()

  def save(self, step: int, *args, **kwargs) -> bool:
    # Orbax's save first waits for the previous one: its failure is named as that step's.
    with self._disk_full_explained(step):
      saved = super().save(step, *args, **kwargs)
    self.saving = step
    return saved

  def wait_until_finished(self) -> None:
    with self._disk_full_explained(self.saving):
      super().wait_until_finished()

  def close(self) -> None:
    try:
      super().close()
    finally:
      logging.get_absl_logger().removeFilter(self._quiet)

  @contextlib.contextmanager
  def _disk_full_explained(self, step: Optional[int]):
    try:
      yield
    except DiskFullError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if not _is_disk_full(e):
        raise
      raise disk_full_error(str(self.directory), step, self.keep) from e


def _ignore_reports_of_closed_loops() -> None:
  """Drops the unraisable "Event loop is closed" errors of callbacks that outlived their loop;
  every other unraisable error is reported as before."""
  previous = sys.unraisablehook
  if getattr(previous, 'ignores_closed_loops', False):
    return

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
      previous(unraisable)
  hook.ignores_closed_loops = True
  sys.unraisablehook = hook


def _is_disk_full(error) -> bool:
  """Whether `error` (an exception, or a log record with its text and exception) comes from a
  full disk: an OSError with errno ENOSPC in its chain, or tensorstore's ValueError, which gives
  only the text."""
  if isinstance(error, std_logging.LogRecord):
    text, error = error.getMessage(), error.exc_info[1] if error.exc_info else None
    if os.strerror(errno.ENOSPC) in text:
      return True
  while error is not None:
    if getattr(error, 'errno', None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


def disk_full_error(directory: str, step: Optional[int], keep: Optional[int]) -> 'DiskFullError':
  """What a full disk during the save of `step` means for the run, and what to do."""
  complete = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  if complete:
    size = format_bytes(disk_usage(os.path.join(directory, str(complete[-1]))))
    needs = f' A checkpoint takes {size} (step {complete[-1]}\'s)'
    resume = f'step {complete[-1]}, the newest complete checkpoint'
  else:
    needs, resume = ' No checkpoint is complete yet, so its size is unknown', 'step 0'
  room = (f'; keep_checkpoints={keep} needs room for {keep + 1} of them while one is saved'
          if keep else '')
  return DiskFullError(
      f'The disk is full: the checkpoint of step {step} could not be written in {directory}.'
      f'{needs}{room}. Free space (or lower --config.keep_checkpoints, or use a --workdir on '
      f'another disk) and rerun the same command: it resumes from {resume}.')


def log_unfinished_saves(directory: str) -> None:
  """Names the temporary directories of unfinished saves in `directory` (Orbax removes them when
  a writer opens it) and the space they take."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  unfinished = sorted(ocp.path.step.tmp_checkpoints(directory))
  if unfinished:
    logging.warning(
        'Removing the unfinished checkpoint saves in %s, left by saves cut short (a second '
        'Ctrl-C, a killed process): %s.', directory,
        ', '.join(f'{name} ({format_bytes(disk_usage(os.path.join(directory, name)))})'
                  for name in unfinished))


def disk_usage(path: str) -> int:
  """Bytes of the files under `path`."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(path) for name in names)


def format_bytes(n: int) -> str:
  """1,234 bytes, 12.3 kB, 4.5 MB, 6.7 GB."""
  for unit in ('bytes', 'kB', 'MB', 'GB'):
    if n < 1000 or unit == 'GB':
      return f'{n:,} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1000


@contextlib.contextmanager
def _hidden_warning(prefix: str):
  """Drops Orbax's log records that start with `prefix` meanwhile."""
  logger = logging.get_absl_logger()
  keep = lambda record: not record.getMessage().startswith(prefix)
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


# Orbax splits the write of a replicated array between its replicas (each writes a slice), one
# slicing op and one write per replica and array: for the state's ~900 small arrays replicated on 8
# devices that made a save block training 5x longer (0.7 s against 0.14 s on a CPU, and 1.9 s
# against 1.1 s in the background). Only an array of at least 4 MiB per replica is split now; one
# replica writes each smaller one, as Orbax does for unreplicated arrays.
with _hidden_warning('Type handler registry'):  # its note that it replaces the default handler
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=4 << 20),
      override=True)


def save(mngr: ocp.CheckpointManager, step: int, state: Any) -> None:
  mngr.save(step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(state)}), force=True)


def restore_latest(mngr: ocp.CheckpointManager, target: Any = None,
                   step: Optional[int] = None, *,
                   only: Optional[Sequence[str]] = None,
                   set_aside_unreadable: bool = False) -> tuple[Optional[int], Any]:
  """Restores `step` (default: the newest that reads back), into the structure of `target`.

  Returns (step, state), or (None, None) when the directory holds no checkpoint. Newer checkpoints
  that cannot be read are skipped with one warning each (and, with `set_aside_unreadable`, renamed
  to `<step>.unreadable.<time>` so that training can write those steps again); when none can be
  read, UnreadableCheckpointsError says so and nothing is renamed. A checkpoint whose arrays differ
  from `target`'s (another model's workdir) is a CheckpointMismatchError. With `only` (names of the
  state's entries, e.g. ('params', 'batch_stats')), the state is a dict of just those, as numpy
  arrays, whatever the devices it was saved from; the other entries are not read, and names the
  checkpoint lacks (or holds as None) map to None.
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  if step is not None:
    if step not in steps:
      raise errors.NotFoundError(
          f'No checkpoint for step {step} in {mngr.directory}; available: {sorted(steps)}.')
    steps = [step]
  restore_args = (ocp.args.StandardRestore(target) if target is not None
                  else ocp.args.StandardRestore())
  unreadable = []
  for s in steps:
    try:
      with _reads_finish_before_loops_close():
        if target is not None:
          check_fits(_saved_tree(mngr, s), target, s, mngr.directory)
        if only is not None:
          restored = {ITEM: _restore_only(mngr, s, only)}
        else:
          restored = mngr.restore(s, args=ocp.args.Composite(**{ITEM: restore_args}))
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      unreadable.append((s, e))
      continue
    for bad, error in unreadable:
      aside = f' and set it aside as {set_aside(mngr, bad)}' if set_aside_unreadable else ''
      logging.warning('Checkpoint %d in %s cannot be read (%s): using step %d instead%s.', bad,
                      mngr.directory, errors.describe(error), s, aside)
    return s, restored[ITEM]
  if unreadable:
    raise UnreadableCheckpointsError(
        f'None of the checkpoints in {mngr.directory} can be read:\n'
        + ''.join(f'  step {s}: {errors.describe(e)}\n' for s, e in unreadable))
  return None, None


def resume(workdir: str, config: ml_collections.ConfigDict, target: Any, *,
           start_over_if_unreadable: bool = False) -> tuple[Optional[int], Any]:
  """Where a training run in `workdir` starts: (step, state) of its newest readable checkpoint, or
  (None, None) for a new run. Everything is checked before training writes anything:

  * config.json must be readable; fields that differ from `config` are logged as a warning (but
    num_train_steps, which extends a run);
  * a checkpoint of another model (CheckpointMismatchError) is refused;
  * checkpoints that exist but cannot be read, all of them, or only ones set aside earlier, stop
    the run (UnreadableCheckpointsError, nothing renamed) rather than start again from step 0,
    unless `start_over_if_unreadable` (then they are set aside and the run starts from scratch).

  Unreadable checkpoints newer than the one used are set aside, so that training can write those
  steps again. Nothing else changes on disk.
  """
  if os.path.exists(os.path.join(workdir, run_dir.CONFIG)):
    changed = run_dir.diff(read_config(workdir).to_dict(), json.loads(config.to_json_best_effort()))
    if 'num_train_steps' in changed:  # how a run is extended: expected, not a warning
      logging.info('Resuming %s with num_train_steps %s -> %s.', workdir,
                   *changed.pop('num_train_steps'))
    if changed:
      logging.warning('Resuming %s with a config that differs from the saved one in: %s', workdir,
                      '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items()))
  mngr = manager(workdir, read_only=True)
  start_over = ('; or start over from step 0: rerun with --start_over_if_unreadable (they stay, '
                f'renamed STEP{UNREADABLE}TIME), or use a new --workdir.')
  try:
    step, state = restore_latest(mngr, target, set_aside_unreadable=True)
  except UnreadableCheckpointsError as e:
    if not start_over_if_unreadable:
      raise UnreadableCheckpointsError(
          f'{e}Training stops rather than start again from step 0 (nothing was changed). '
          'Restore the checkpoints (e.g. from a backup) and rerun' + start_over) from e
    set_aside_steps = [set_aside(mngr, s) for s in mngr.all_steps()]
    logging.warning('No checkpoint in %s can be read: set aside as %s; starting over from step 0.',
                    mngr.directory, set_aside_steps)
    step, state = None, None
  finally:
    mngr.close()
  earlier = sorted(glob.glob(os.path.join(checkpoint_dir(workdir), f'*{UNREADABLE}*')))
  if step is None and earlier and not start_over_if_unreadable:
    raise UnreadableCheckpointsError(
        f'{checkpoint_dir(workdir)} holds no readable checkpoint, only ones set aside earlier as '
        f'unreadable: {", ".join(map(os.path.basename, earlier))}. Training stops rather than '
        'start again from step 0. Restore good copies (named by their step) and rerun'
        + start_over)
  return step, state


class _LoopWaitingForItsTasks(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks finish before it closes."""

  def close(self):
    if not self.is_running() and not self.is_closed():
      pending = asyncio.all_tasks(self)
      if pending:
        self.run_until_complete(asyncio.wait(pending))
        for task in pending:  # retrieved, so that asyncio does not log each one
          if not task.cancelled():
            task.exception()
    super().close()


@contextlib.contextmanager
def _reads_finish_before_loops_close():
  """Orbax reads a checkpoint's arrays concurrently (tensorstore) in a fresh event loop, which it
  closes as soon as one read fails; each read still in flight then completes by scheduling its
  callback on the closed loop, and tensorstore reports every "Event loop is closed" RuntimeError
  through sys.unraisablehook: tens of thousands of lines for one damaged checkpoint. Loops made
  meanwhile let their reads finish before closing, as asyncio.run() would. Orbax makes its loops
  with asyncio.new_event_loop(), which is replaced meanwhile: event-loop policies, the other way to
  choose the loop it returns, are deprecated from Python 3.14."""
  previous = asyncio.new_event_loop
  asyncio.new_event_loop = _LoopWaitingForItsTasks
  try:
    yield
  finally:
    asyncio.new_event_loop = previous


def set_aside(mngr: ocp.CheckpointManager, step: int) -> str:
  """Renames an unreadable checkpoint out of Orbax's way, keeping it for inspection; returns its
  new name."""
  path = os.path.join(str(mngr.directory), str(step))
  aside = f'{path}{UNREADABLE}{int(time.time())}'
  if jax.process_index() == 0 and os.path.isdir(path):
    os.replace(path, aside)
  mngr.reload()
  return os.path.basename(aside)


def _saved_tree(mngr: ocp.CheckpointManager, step: int) -> Any:
  """The metadata of a checkpoint's arrays, read by the item's handler: the manager's
  item_metadata turns a missing _METADATA file into None, with a warning about handler registries,
  where the handler says the file is missing."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return handler.metadata(mngr.directory / str(step) / ITEM).tree
  finally:
    handler.close()


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


class CheckpointMismatchError(errors.UserError, ValueError):
  """A readable checkpoint of another model or setting."""


class UnreadableCheckpointsError(errors.UserError, RuntimeError):
  """Checkpoints exist, but none can be read."""


class DiskFullError(errors.UserError, OSError):
  """A checkpoint could not be written for lack of space; the earlier ones are intact."""


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


def write_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
  """config.json and its history (run_dir.write_config), from process 0: training goes on from
  `step` under `config`."""
  if jax.process_index() == 0:
    run_dir.write_config(workdir, config, step)
