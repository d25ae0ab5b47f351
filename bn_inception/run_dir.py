"""A run's directory as files: config.json and its history, the lock of the training that runs in
it, and the units its metrics are in.

config.json is the config the run trains under now; config_history.jsonl keeps every config it
trained under, a line each, {"from_step": S, "config": {...}}: the config of steps S+1 on. A resume
that changes a field that keeps the shapes (a lower learning rate) adds a line.

No imports beyond ml_collections: the report reads run directories copied to a machine without
JAX or TensorFlow. Checkpoints (Orbax) are `checkpoints`' business.
"""

import datetime
import json
import os
import socket
from typing import Any, Optional

from absl import logging
import ml_collections

from bn_inception import errors

PAPER_BATCH = 32  # the paper's mini-batch: learning rates and "paper steps" are per 32 images
CONFIG = 'config.json'
CONFIG_HISTORY = 'config_history.jsonl'
LOCK = 'lock'


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise errors.NotFoundError(f'{path} not found: is {workdir} a bn_inception workdir?')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (ValueError, TypeError) as e:  # not JSON (JSONDecodeError, UnicodeDecodeError), or no dict
    raise errors.InputFileError(
        f'{path} cannot be read as a config ({errors.describe(e)}). Restore it, or replace it '
        'with the config the run was started with: evaluation accepts --config=FILE instead, and '
        'training writes it anew once the file is deleted.') from e


def read_config_history(workdir: str) -> list[tuple[int, dict]]:
  """[(from_step, config as a dict)], oldest first. A workdir written before the history was kept
  has config.json alone: one entry from step 0 (the newest config, not necessarily the first)."""
  path = os.path.join(workdir, CONFIG_HISTORY)
  if not os.path.exists(path):
    return [(0, read_config(workdir).to_dict())] if os.path.exists(
        os.path.join(workdir, CONFIG)) else []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  try:
    return [(int(entry['from_step']), entry['config']) for entry in map(json.loads, lines)]
  except (ValueError, KeyError, TypeError) as e:
    raise errors.InputFileError(f'{path} cannot be read as a config history '
                                f'({errors.describe(e)}): restore it or delete it.') from e


def write_config(workdir: str, config: ml_collections.ConfigDict, step: int) -> None:
  """Training goes on from `step` under `config`: config.json becomes it (atomically), and the
  history gains a line where it differs from the config the run trained under so far."""
  new = json.loads(config.to_json_best_effort())
  history = read_config_history(workdir)
  os.makedirs(workdir, exist_ok=True)
  if not history or history[-1][1] != new:
    _write_atomically(os.path.join(workdir, CONFIG_HISTORY), ''.join(
        json.dumps({'from_step': s, 'config': c}, sort_keys=True) + '\n'
        for s, c in history + [(step, new)]))
  _write_atomically(os.path.join(workdir, CONFIG), json.dumps(new, indent=2, sort_keys=True))


def _write_atomically(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


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


class WorkdirLock:
  """WORKDIR/lock, held while a training runs in the workdir, says which process holds it.

  An advisory lock of the operating system (flock), so it goes with the process that held it, however
  that ended; the file then still names that process, and the next training takes it over with a
  warning. A second training on a held workdir is refused, naming the first. One process of a run
  holds it (process 0), so the processes of one run never refuse each other.
  """

  def __init__(self, workdir: str):
    import fcntl  # pylint: disable=g-import-not-at-top  # POSIX; the report (no lock) runs anywhere
    self.created = not os.path.exists(workdir)
    self.workdir, self.path = workdir, os.path.join(workdir, LOCK)
    os.makedirs(workdir, exist_ok=True)
    while True:
      self.file = open(self.path, 'a+')  # pylint: disable=consider-using-with  # until release
      try:
        fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = self._holder()
        self.file.close()
        raise errors.ConfigError(
            f'{workdir} is in use by another training ({self._describe(holder)}; {self.path}): '
            'two runs in one workdir would overwrite each other\'s checkpoints. Wait for it to '
            'end, or use another --workdir.') from None
      except OSError as e:  # a file system without locks (some network or FUSE mounts)
        logging.warning('%s cannot be locked (%s): nothing stops a second training in this '
                        'workdir.', self.path, errors.describe(e))
      if self._is_the_path():
        break
      self.file.close()  # released (deleted) by its holder meanwhile: lock the file there now
    left = self._holder()
    if left:
      logging.warning('Taking over %s, left by %s, which no longer holds it (it ended without '
                      'releasing it: killed, or its host went down).', self.path,
                      self._describe(left))
    self.file.truncate(0)
    self.file.write(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                                'since': datetime.datetime.now().isoformat(timespec='seconds')}))
    self.file.flush()

  def _is_the_path(self) -> bool:
    try:
      return os.stat(self.path).st_ino == os.fstat(self.file.fileno()).st_ino
    except FileNotFoundError:
      return False

  def _holder(self) -> Optional[dict]:
    self.file.seek(0)
    try:
      return json.loads(self.file.read() or 'null')
    except ValueError:
      return {}

  @staticmethod
  def _describe(holder: Optional[dict]) -> str:
    if not holder:
      return 'a process that has not said which'
    return f'process {holder.get("pid")} on host {holder.get("host")}, since {holder.get("since")}'

  def release(self) -> None:
    """Ends the hold and deletes the lock (while still holding it, so that no one locks a file
    about to go). A workdir the lock created is removed again when it holds nothing else: a run
    refused before writing leaves no trace."""
    os.remove(self.path)
    self.file.close()
    if self.created and not os.listdir(self.workdir):
      os.rmdir(self.workdir)


def check_writable(workdir: str, flag: str = '--workdir') -> None:
  """Refuses a workdir that training could not create or write (a file, a path under a file, a
  directory this user may not write), before the minutes of setup that would end in a traceback."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'is' if existing == path else f'cannot be created: {existing} is'
    raise errors.ConfigError(f'{flag}={workdir} {where} a file, not a directory. Name a directory '
                             '(training creates it), e.g. --workdir=runs/bn_x30.')
  if not os.access(existing, os.W_OK | os.X_OK):
    what = 'the directory' if existing == path else f'cannot be created: {existing}'
    raise errors.ConfigError(f'{flag}={workdir}: {what} is not writable by this user. Choose a '
                             'directory you can write, or change its permissions.')
