"""The commands README.md and the scripts' docstrings show, run as far as they can be without data
or hours: every training command's flags parse and its config passes the checks a run makes before
it starts (on one CPU device; the CPU try-it commands also the memory estimates), every evaluation
command's flags and checkpoint parse, and the tiny archives are written. A documented command that
would be refused fails here."""

import ast
import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROGRAM = re.compile(r'python3? (-m bn_inception\.\w+|scripts/\w+\.py)(?=\s|$)')
FENCE = re.compile(r'^ *```[a-z]*\n(.*?)^ *```', re.S | re.M)


def commands_in(text: str, fenced: bool = True) -> list[tuple[str, list[str]]]:
  """(program, arguments) of each command in `text`: in its code blocks (`fenced`; else every
  line), continued lines joined, loops' variables expanded, and in its inline code. Optional parts
  ([...]), comments and what follows `--` or a shell operator are left out."""
  blocks = FENCE.findall(text) if fenced else [text]
  pieces = []
  for block in blocks:
    loops = dict(re.findall(r'for (\w+) in ([^;]+); do', block))
    for line in block.replace('\\\n', ' ').splitlines():
      variables = [v for v in loops if f'${v}' in line]
      pieces += ([line.replace(f'${variables[0]}', value) for value in loops[variables[0]].split()]
                 if variables else [line])
  if fenced:
    pieces += [' '.join(code.split()) for code in re.findall(r'`([^`]+)`', FENCE.sub('', text))]
  found = []
  for piece in pieces:
    piece = re.sub(r'\[[^\]]*\]', '', piece.split(' #')[0])
    starts = list(PROGRAM.finditer(piece))
    for start, end in zip(starts, starts[1:] + [None]):
      rest = piece[start.end():end.start() if end else None]
      rest = re.split(r' -- |["&;|()]', rest)[0]
      found.append((start.group(1).replace('-m ', ''), shlex.split(rest)))
  return found


def documented_commands() -> list[tuple[str, list[str]]]:
  with open(os.path.join(REPO, 'README.md')) as f:
    found = commands_in(f.read())
  for path in sorted(glob.glob(os.path.join(REPO, 'scripts', '*.py'))):
    with open(path) as f:
      found += commands_in(ast.get_docstring(ast.parse(f.read())) or '', fenced=False)
  # A placeholder for each process's id in the several-hosts command.
  return [(program, [re.sub(r'^--process_id=I$', '--process_id=0', a) for a in args])
          for program, args in found]


COMMANDS = documented_commands()
TRY_IT = ('_digits', ':digits', 'tiny')  # the commands meant for a CPU

CHECK_TRAINING = '''
import json, sys
import jax
from absl import flags
from bn_inception import config_checks, main, train
mesh = train.make_mesh(jax.devices()[:1])
refusals = []
for args in json.load(sys.stdin):
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:  # the last command's overrides
    delattr(flags.FLAGS, name)
  sys.argv = ['main', *args]  # where ml_collections reads the --config.FIELD overrides
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(sys.argv)
    config = main._CONFIG.value
    config_checks.check(config)
    train.check_batch(config.batch_size, config.model.bn_group_size, mesh)
    if any(word in ' '.join(args) for word in %r):
      train.check_memory(config, config.batch_size, mesh, training=True)
      batch = train.eval_batch_size(config, config.dataset.eval_crops, mesh)
      train.check_memory(config, batch * train.data_spec.num_crops(config.dataset.eval_crops),
                         mesh, training=False, field='eval_batch_size')
    refusals.append(None)
  except Exception as e:
    refusals.append(f'{type(e).__name__}: {e}')
print(json.dumps(refusals))
''' % (TRY_IT,)

CHECK_EVALUATION = '''
import json, sys
from absl import flags
from bn_inception import config_checks, evaluate
config_flag = evaluate.define_flags()
refusals = []
for args in json.load(sys.stdin):
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:  # the last command's overrides
    delattr(flags.FLAGS, name)
  sys.argv = ['evaluate', *args]
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(sys.argv)
    evaluate.resolve_checkpoint(flags.FLAGS.workdir, flags.FLAGS.checkpoint)
    if config_flag.value is not None:
      config_checks.check(config_flag.value, training=False)
      for name in flags.FLAGS.eval_sets or []:
        evaluate.eval_set_config(config_flag.value, name)
    refusals.append(None)
  except Exception as e:
    refusals.append(f'{type(e).__name__}: {e}')
print(json.dumps(refusals))
'''


def refusals(script: str, commands: list[list[str]]) -> list:
  """What `script` (one process for all the commands) says of each: None, or the refusal."""
  result = subprocess.run([sys.executable, '-c', script], input=json.dumps(commands), cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'},
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_readme_shows_the_try_it_commands():
  training = [args for program, args in COMMANDS if program == 'bn_inception.main']
  assert any('--config=configs/bn_x30.py:digits' in args for args in training)
  assert any('--config.dataset.manual_dir=/tmp/tiny/manual' in args for args in training)
  assert ('scripts/make_tiny_imagenet.py', ['/tmp/tiny/manual']) in COMMANDS
  assert len(training) >= 10


def test_every_documented_training_command_passes_the_checks():
  training = [args for program, args in COMMANDS if program == 'bn_inception.main']
  # The tiny archives' command as it was first documented, and the same with a flag that no config
  # has: refused, so that the checks below can fail.
  tiny = next(args for args in training if '--config.dataset.manual_dir=/tmp/tiny/manual' in args)
  refused = [[a for a in tiny if not a.startswith('--config.model.bn_group_size')],
             tiny + ['--config.model.no_such_field=1']]
  said = refusals(CHECK_TRAINING, refused + training)
  assert 'bn_group_size' in said[0] and said[1] is not None, said[:2]
  assert {' '.join(args): why for args, why in zip(training, said[2:]) if why} == {}


def test_every_documented_evaluation_command_parses():
  evaluation = [args for program, args in COMMANDS if program == 'bn_inception.evaluate']
  assert len(evaluation) >= 8
  said = refusals(CHECK_EVALUATION, [['--crops=7', '--workdir=runs/x']] + evaluation)
  assert said[0] is not None, said[0]  # a refusal shows
  assert {' '.join(args): why for args, why in zip(evaluation, said[1:]) if why} == {}


@pytest.mark.parametrize('program', ['scripts/make_tiny_imagenet.py'])
def test_documented_script_commands_run(tmp_path, program):
  # --imagenet_sized writes 1,000 large images (a minute): its flag is parsed below, with --help.
  for args in [args for p, args in COMMANDS if p == program and '--imagenet_sized' not in args]:
    out = tmp_path / os.path.basename(args[0])
    result = subprocess.run([sys.executable, program, str(out), *args[1:]], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ['ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar']
  help_dir = tmp_path / 'help'
  help_dir.mkdir()
  result = subprocess.run([sys.executable, os.path.join(REPO, program), '--help'], cwd=help_dir,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0 and '--imagenet_sized' in result.stdout, result.stderr
  assert os.listdir(help_dir) == []  # --help writes nothing (it once made a directory '--help')
