"""The paper in miniature on a CPU, in minutes: what `make demo` (scripts/demo.py) runs.

Trains the five variants of paper section 4.2.2 at the `:digits` scale of their own configs
(train.train_and_evaluate), evaluates each final checkpoint (evaluate.evaluate_checkpoint),
ensembles the four BN runs (ensemble.ensemble_files), runs the Figure 1 experiment (mlp.py), and
writes into one folder:

  results.md            Figure 3's table from these runs, the settings, and what they show
  figure2_accuracy.png  test accuracy against training steps, one curve per variant (Figure 2)
  figure1_mlp.png       the sigmoid MLP with and without BN (Figure 1 a, b, c)
  runs/<variant>/       each run's workdir (checkpoints, config.json, metrics.jsonl) and test.npz
  ensemble.npz          the ensemble's predictions

Every number in results.md comes from the run; the paper's appear only as the claims checked.
"""

import contextlib
import dataclasses
import datetime
import importlib
import json
import logging as std_logging
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from typing import Optional, Sequence

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from bn_inception import ensemble
from bn_inception import evaluate
from bn_inception import mlp
from bn_inception import predictions
from bn_inception import train

# (paper name, config module), in the order of the paper's Figure 3.
VARIANTS = (
    ('Inception', 'inception'),
    ('BN-Baseline', 'bn_baseline'),
    ('BN-x5', 'bn_x5'),
    ('BN-x30', 'bn_x30'),
    ('BN-x5-Sigmoid', 'bn_x5_sigmoid'),
)
BASELINE = 'Inception'  # its best accuracy is the target the others race to (Figure 3)

# --quick: the whole pipeline at a size where compilation is nearly all the time (tests).
QUICK = dict(width=0.125, batch_size=32, steps=10, eval_every=5, mlp_steps=2000, mlp_eval_every=200)
MLP_STEPS, MLP_EVAL_EVERY = 50_000, 500  # the paper's Figure 1 length

Curve = Sequence[tuple[int, float]]  # (step, test top-1), in step order


# ------------------------------------------------------------------------------------------------
# Figure 3's numbers: pure functions of the evaluation curves.
# ------------------------------------------------------------------------------------------------
def steps_to_target(curve: Curve, target: float) -> Optional[int]:
  """The first evaluated step whose accuracy reaches `target`; None if none does."""
  return next((step for step, accuracy in curve if accuracy >= target), None)


def best(curve: Curve) -> tuple[float, int]:
  """(maximum accuracy, the first step at which it was reached)."""
  top = max(accuracy for _, accuracy in curve)
  return top, steps_to_target(curve, top)


def figure3(curves: dict[str, Curve], baseline: str = BASELINE) -> tuple[float, list[dict]]:
  """(target, rows): the target is the baseline's best accuracy; a row per curve with
  name, steps_to_target (None: never), max_accuracy, max_step."""
  target, _ = best(curves[baseline])
  rows = []
  for name, curve in curves.items():
    top, top_step = best(curve)
    rows.append(dict(name=name, steps_to_target=steps_to_target(curve, target), max_accuracy=top,
                     max_step=top_step))
  return target, rows


# ------------------------------------------------------------------------------------------------
# Configs and runs.
# ------------------------------------------------------------------------------------------------
def variant_config(module: str, quick: bool = False,
                   steps: Optional[int] = None) -> ml_collections.ConfigDict:
  """configs/<module>.py:digits, shrunk for --quick, optionally with another training length."""
  c = importlib.import_module(f'configs.{module}').get_config('digits')
  if quick:
    c.model.width = QUICK['width']
    c.batch_size = QUICK['batch_size']
    steps = steps or QUICK['steps']
    c.eval_every_steps = c.log_every_steps = QUICK['eval_every']
  if steps:
    c.paper_steps = steps * c.batch_size // train.PAPER_BATCH  # num_train_steps follows
    c.checkpoint_every_steps = min(c.checkpoint_every_steps, steps)
  return c


@dataclasses.dataclass
class VariantRun:
  name: str
  module: str
  config: ml_collections.ConfigDict
  workdir: str
  curve: list[tuple[int, float]]  # training's evaluations: (step, test top-1)
  final_top1: float  # evaluate_checkpoint on the final checkpoint
  img_per_s: float  # median over the logged intervals, compilation excluded
  wall_s: float  # training, evaluation and the predictions file, compilation included


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def run_variant(name: str, module: str, config: ml_collections.ConfigDict, workdir: str,
                devices: Sequence) -> VariantRun:
  """Trains, evaluates the final checkpoint and writes its predictions (workdir/test.npz)."""
  start = time.perf_counter()
  train.train_and_evaluate(config, workdir, devices=list(devices))
  p = evaluate.evaluate_checkpoint(config, workdir, mesh=train.make_mesh(list(devices)))
  predictions.save(os.path.join(workdir, 'test.npz'), p)
  wall = time.perf_counter() - start
  metrics = read_metrics(workdir)
  curve = [(m['step'], m['eval_top1']) for m in metrics if 'eval_top1' in m]
  rates = [m['img_per_s'] for m in metrics if 'img_per_s' in m]
  return VariantRun(name, module, config, workdir, curve, predictions.accuracy(p)['top1'],
                    statistics.median(rates) if rates else float('nan'), wall)


# ------------------------------------------------------------------------------------------------
# Progress: one status line while the runs train.
# ------------------------------------------------------------------------------------------------
class Progress:
  """Which variant, its step, its latest test accuracy, elapsed time and time left, on stderr.

  train_and_evaluate's loop cannot be hooked from outside and its absl log is silenced during the
  demo, but it appends to WORKDIR/metrics.jsonl as it goes: a thread polls that file. On a terminal
  the line is rewritten in place; otherwise a line is printed per evaluation.
  """

  def __init__(self, num_variants: int, stream=None, poll_s: float = 0.5):
    self.stream = stream or sys.stderr
    self.tty = getattr(self.stream, 'isatty', lambda: False)()
    self.num_variants, self.poll_s = num_variants, poll_s
    self.start = time.perf_counter()
    self.durations: list[float] = []  # finished variants' wall time
    self._lock = threading.Lock()

  def _write(self, text: str, final: bool) -> None:
    with self._lock:
      if self.tty:
        self.stream.write('\r\x1b[K' + text + ('\n' if final else ''))
      elif final:
        self.stream.write(text + '\n')
      self.stream.flush()

  def message(self, text: str) -> None:
    self._write(text, final=True)

  @contextlib.contextmanager
  def variant(self, index: int, name: str, workdir: str, num_steps: int, batch_size: int):
    state = dict(start=time.perf_counter(), step=0, top1=None, s_per_step=None, overhead=None,
                 offset=0)
    label = f'[{index + 1}/{self.num_variants}] {name}'
    path = os.path.join(workdir, 'metrics.jsonl')

    def poll():
      if not os.path.exists(path):
        return
      with open(path) as f:
        f.seek(state['offset'])
        text = f.read()
      complete = text[:text.rfind('\n') + 1]  # a line still being written waits for the next poll
      state['offset'] += len(complete.encode())
      for line in complete.splitlines():
        m = json.loads(line)
        state['step'] = m['step']
        if 'img_per_s' in m:
          state['s_per_step'] = batch_size / m['img_per_s']
          if state['overhead'] is None:  # compilation and start-up, before the first step
            state['overhead'] = (time.perf_counter() - state['start'] -
                                 m['step'] * state['s_per_step'])
        if 'eval_top1' in m:
          state['top1'] = m['eval_top1']
          if not self.tty:
            self._write(status(), final=True)

    def eta() -> Optional[float]:
      now = time.perf_counter() - state['start']
      if state['s_per_step'] is not None:
        this_run = state['overhead'] + num_steps * state['s_per_step']
      elif self.durations:
        this_run = statistics.mean(self.durations)
      else:
        return None
      per_run = statistics.mean(self.durations) if self.durations else this_run
      return max(this_run - now, 0) + (self.num_variants - index - 1) * per_run

    def status() -> str:
      parts = [label]
      parts.append(f'step {state["step"]}/{num_steps}' if state['step'] else 'compiling')
      if state['top1'] is not None:
        parts.append(f'test top-1 {100 * state["top1"]:.1f}%')
      left = eta()
      parts.append(f'{train.format_seconds(time.perf_counter() - self.start)} elapsed' +
                   (f', ~{train.format_seconds(left)} left' if left is not None else ''))
      return '  '.join(parts)

    stop = threading.Event()

    def loop():
      while not stop.wait(self.poll_s):
        poll()
        if self.tty:
          self._write(status(), final=False)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      poll()
    self.durations.append(time.perf_counter() - state['start'])
    self._write(f'{label}: {num_steps} steps, final test top-1 {100 * (state["top1"] or 0):.1f}%, '
                f'{train.format_seconds(self.durations[-1])}', final=True)


@contextlib.contextmanager
def quiet_absl():
  """Only warnings from the library, none from Orbax (it warns about read-only managers)."""
  absl_logger = std_logging.getLogger('absl')  # filters here apply whichever handler prints
  only_ours = lambda record: 'orbax' not in record.pathname or record.levelno >= std_logging.ERROR
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  absl_logger.addFilter(only_ours)
  try:
    yield
  finally:
    absl_logger.removeFilter(only_ours)
    logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------
# Figures.
# ------------------------------------------------------------------------------------------------
def plot_figure2(runs: Sequence[VariantRun], target: float, rows: Sequence[dict],
                 path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  batch = runs[0].config.batch_size
  fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
  for run, row in zip(runs, rows):
    steps, accuracy = zip(*run.curve)
    line, = ax.plot(steps, accuracy, marker='.', label=run.name)
    if row['steps_to_target'] is not None:
      ax.plot([row['steps_to_target']], [target], marker='*', markersize=13, color=line.get_color(),
              markeredgecolor='black', zorder=3)
  ax.axhline(target, color='gray', linestyle=':', linewidth=1)
  ax.annotate(f"{BASELINE}'s maximum {100 * target:.1f}% (stars: steps to reach it)",
              (0.01, target), xycoords=('axes fraction', 'data'), va='bottom', fontsize=8,
              color='dimgray')
  ax.set_ylabel('test top-1 accuracy (360 digits)')
  ax.set_ylim(0, 1.02)
  if batch == train.PAPER_BATCH:
    ax.set_xlabel('training steps of 32 images (= paper steps)')
  else:
    ax.set_xlabel(f'training steps of {batch} images')
    top = ax.secondary_xaxis('top', functions=(lambda s: s * batch / 32, lambda p: p * 32 / batch))
    top.set_xlabel('paper steps (images / 32)')
  ax.grid(alpha=0.3)
  ax.legend(loc='lower right')
  ax.set_title('Figure 2 in miniature: the five variants on digits', fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_figure1(without_bn: mlp.Curves, with_bn: mlp.Curves, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=120)
  axes[0].plot(without_bn.steps, without_bn.test_accuracy, label='Without BN')
  axes[0].plot(with_bn.steps, with_bn.test_accuracy, label='With BN')
  axes[0].set_ylim(0.7, 1)  # as the paper's panel (a)
  axes[0].set_ylabel('test accuracy (360 digits)')
  axes[0].legend(loc='lower right')
  axes[0].set_title('(a) test accuracy', fontsize=10)
  low = min(without_bn.sigmoid_input.min(), with_bn.sigmoid_input.min())
  high = max(without_bn.sigmoid_input.max(), with_bn.sigmoid_input.max())
  panels = ((axes[1], without_bn, '(b) without BN'), (axes[2], with_bn, '(c) with BN'))
  for ax, curves, title in panels:
    for column, q in enumerate(mlp.PERCENTILES):
      ax.plot(curves.steps, curves.sigmoid_input[:, column], color='C0' if q == 50 else 'C1',
              label=('median' if q == 50 else '15th, 85th percentiles') if column < 2 else None)
    ax.set_ylim(low - 0.2, high + 0.2)
    ax.set_ylabel('sigmoid input of one last-layer unit')
    ax.set_title(f'{title}: its 15/50/85th percentiles', fontsize=10)
  axes[1].legend(loc='lower right', fontsize=8)
  for ax in axes:
    ax.set_xlabel('training steps (60 examples)')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# results.md
# ------------------------------------------------------------------------------------------------
def pct(x: float) -> str:
  return f'{100 * x:.1f}%'


# Why a claim may not show on digits, and which setting would be expected to show it.
SATURATED = (
    'On digits every variant ends within a few points of 100%, where one test image is 0.28 points '
    'and the target is a single evaluation of a noisy curve: which run first reaches it is decided '
    'by noise as much as by speed (the early-training line above compares speed without a '
    'threshold). Expected to show it: a task the networks do not saturate within the run, such as '
    'the paper\'s own (`configs/inception.py` and the BN configs on ImageNet).')


def findings(runs: dict[str, VariantRun], target: float, rows: dict[str, dict],
             ensemble_rows: Sequence[dict], without_bn: mlp.Curves,
             with_bn: mlp.Curves) -> list[str]:
  """What these runs show about each of the paper's claims, computed from them; for a claim they do
  not show, the setting that would be expected to."""
  last = runs[BASELINE].curve[-1][0]
  base_steps = rows[BASELINE]['max_step']
  verdict = lambda shown: 'shown.' if shown else 'not shown.'
  out = []

  def reached(name):
    s = rows[name]['steps_to_target']
    if s is None:
      return f'{name} never reached it in {last} steps (best {pct(rows[name]["max_accuracy"])})'
    return f'{name} reached it at step {s}, {base_steps / s:.1f}x fewer steps than {BASELINE}'

  epochs = last * runs[BASELINE].config.batch_size / 1437
  out.append(
      f'**Target.** {BASELINE} (no BN) reached its maximum test accuracy, {pct(target)}, at step '
      f'{base_steps} of {last}.' + (
          f' It was still improving at its last evaluation: the paper trained it to its peak (31M '
          f'steps, about 774 epochs), this run for {epochs:.0f} epochs.'
          if base_steps == last else ''))

  quarter = len(runs[BASELINE].curve) // 4 - 1
  step_q = runs[BASELINE].curve[max(quarter, 0)][0]
  early = ', '.join(f'{name} {pct(dict(r.curve).get(step_q, float("nan")))}'
                    for name, r in runs.items())
  mean = ', '.join(f'{name} {pct(np.mean([a for _, a in r.curve]))}' for name, r in runs.items())
  out.append(f'**Early training** (Figure 2). Test top-1 at step {step_q}, a quarter of the run: '
             f'{early}. Mean over all evaluations: {mean}.')

  s = rows['BN-Baseline']['steps_to_target']
  shown = s is not None and s <= base_steps / 2
  out.append(
      f'**BN-Baseline matches Inception in less than half the steps** (paper: 13.3M vs 31.0M). '
      f'{reached("BN-Baseline")}: {verdict(shown)}' + ('' if shown else ' ' + SATURATED))

  s = rows['BN-x5']['steps_to_target']
  shown = s is not None and s < base_steps
  out.append(
      f'**BN-x5 needs 14 times fewer steps than Inception.** {reached("BN-x5")}: fewer steps '
      f'{verdict(shown)}' + (' ' + SATURATED if not shown else
                              f' (The paper: 14x; here {base_steps / s:.1f}x.)'))

  first5, first30 = runs['BN-x5'].curve[0], runs['BN-x30'].curve[0]
  slower_start = first30[1] < first5[1]
  higher_max = rows['BN-x30']['max_accuracy'] > rows['BN-x5']['max_accuracy']
  out.append(
      f'**BN-x30 starts slower than BN-x5 but ends higher** (paper: 74.8% vs 73.0%). At the first '
      f'evaluation (step {first5[0]}) BN-x30 had {pct(first30[1])}, BN-x5 {pct(first5[1])}; '
      f'maxima {pct(rows["BN-x30"]["max_accuracy"])} vs {pct(rows["BN-x5"]["max_accuracy"])}. '
      f'Slower start {verdict(slower_start)[:-1]}; higher maximum {verdict(higher_max)}' + (
          '' if higher_max else
          f' The paper\'s BN-x30 pulled ahead late, its maximum after 6M steps (150 epochs, the '
          f'learning rate decayed 112 times by x0.96); this run lasted {epochs:.0f} epochs. '
          f'Expected, if at all on digits, with a run of that many epochs: `--steps 6000` '
          f'(133 epochs; roughly half an hour on 2 cores; not tried).'))

  sig = rows['BN-x5-Sigmoid']
  trains, below = sig['max_accuracy'] > 0.5, sig['steps_to_target'] is None
  out.append(
      f'**BN-x5-Sigmoid trains, but stays below Inception** (paper: 69.8%, never 72.2%). '
      f'{reached("BN-x5-Sigmoid")}; its maximum {pct(sig["max_accuracy"])}. Trains '
      f'{verdict(trains)[:-1]}; stays below {verdict(below)}' + ('' if below else
          ' Ten digit classes leave a sigmoid BN network capacity to spare; the paper\'s gap is '
          'on 1000-class ImageNet at full width (`configs/bn_x5_sigmoid.py`).') +
      ' (A sigmoid Inception without BN, which the paper says stays at chance, is not among the '
      'five runs; the MLP below is the sigmoid-without-BN case here.)')

  members, combined = ensemble_rows[:-1], ensemble_rows[-1]
  best_member = max(members, key=lambda r: r['top1'])
  out.append(
      f'**An ensemble beats its members** (paper: 6 BN-x30 variants, 144 crops). The four BN '
      f'runs\' final checkpoints averaged: {pct(combined["top1"])} top-1; best member '
      f'{best_member["name"].split("/")[0]} {pct(best_member["top1"])}: '
      + verdict(combined['top1'] > best_member['top1']) + (
          '' if combined['top1'] > best_member['top1'] else
          ' The paper\'s members were six runs of its best recipe; these are four different '
          'variants, and 360 test images are few.'))

  k = min(1, len(without_bn.steps) - 1)  # the first evaluation after training started
  at = lambda c, i: '/'.join(f'{x:.2f}' for x in c.sigmoid_input[i])
  change = lambda c: float(np.mean(np.abs(c.sigmoid_input[-1] - c.sigmoid_input[k])))
  faster = with_bn.test_accuracy[k] > without_bn.test_accuracy[k]
  stable = change(with_bn) < change(without_bn)
  out.append(
      f'**Figure 1: BN trains the sigmoid MLP faster and keeps its inputs\' distribution stable.** '
      f'Test accuracy at step {without_bn.steps[k]}: {pct(with_bn.test_accuracy[k])} with BN, '
      f'{pct(without_bn.test_accuracy[k])} without; at step {without_bn.steps[-1]}: '
      f'{pct(with_bn.test_accuracy[-1])} vs {pct(without_bn.test_accuracy[-1])}. The 15/50/85th '
      f'percentiles of the unit\'s sigmoid input went from {at(with_bn, k)} (step '
      f'{with_bn.steps[k]}) to {at(with_bn, -1)} with BN, from {at(without_bn, k)} to '
      f'{at(without_bn, -1)} without: a mean change of {change(with_bn):.2f} against '
      f'{change(without_bn):.2f}. Faster {verdict(faster)[:-1]}; more stable {verdict(stable)}' + (
          '' if faster and stable else
          ' The paper\'s run had MNIST\'s 60,000 training images; expected to show with more '
          'data than digits\' 1,437.'))
  return out


def settings_table(runs: Sequence[VariantRun]) -> str:
  lines = ['| variant | LR per 32 images | decay x0.96 every | L2 | dropout | LRN | '
           'steps | wall time | img/s |', '|---|---|---|---|---|---|---|---|---|']
  for r in runs:
    c = r.config
    lines.append(
        f'| {r.name} | {c.learning_rate:g} | {c.lr_decay_epochs:.3g} epochs | {c.weight_decay:g} '
        f'| {c.model.dropout_rate:g} | {"yes" if c.model.lrn else "no"} | {c.num_train_steps} | '
        f'{train.format_seconds(r.wall_s)} | {r.img_per_s:.0f} |')
  return '\n'.join(lines)


def results_markdown(runs: dict[str, VariantRun], target: float, rows: Sequence[dict],
                     ensemble_rows: Sequence[dict], without_bn: mlp.Curves, with_bn: mlp.Curves,
                     wall_s: float, mlp_wall_s: float, command: str, output: str) -> str:
  first = next(iter(runs.values())).config
  batch = first.batch_size
  by_name = {r['name']: r for r in rows}
  table = [f'| Model | Steps to {pct(target)} | Max accuracy | at step | Final (evaluate) |',
           '|---|---|---|---|---|']
  for row in rows:
    s = row['steps_to_target']
    table.append(f'| {row["name"]} | {s if s is not None else "never"} | '
                 f'{pct(row["max_accuracy"])} | {row["max_step"]} | '
                 f'{pct(runs[row["name"]].final_top1)} |')
  combined = pct(ensemble_rows[-1]['top1'])
  table.append(f'| Ensemble of the 4 BN runs (mean of probabilities) | | {combined} | '
               f'{first.num_train_steps} (final checkpoints) | {combined} |')
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    pass
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  out = [
      '# BN-Inception in miniature: results of this run',
      '',
      f'`{command}`, {datetime.date.today().isoformat()}, {cores} CPU cores ({cpu}), '
      f'JAX device: {device.platform} ({device.device_kind}).',
      '',
      '## Figure 3 in miniature',
      '',
      f'Test top-1 on the 360 held-out digits, evaluated every {first.eval_every_steps} steps of '
      f'{batch} images during training (population BN statistics); the target is {BASELINE}\'s '
      f'best accuracy, "steps to" the first evaluation that reaches it. "Final" is '
      f'`evaluate.evaluate_checkpoint` on the last checkpoint. One step is {batch} images '
      f'({batch / 32:g} paper step{"s" if batch != 32 else ""}).',
      '',
      *table,
      '',
      '![Figure 2](figure2_accuracy.png)',
      '',
      '## What the runs show, claim by claim',
      '',
      *[f'- {f}' for f in findings(runs, target, by_name, ensemble_rows, without_bn, with_bn)],
      '',
      '![Figure 1](figure1_mlp.png)',
      '',
      '## Settings',
      '',
      f'- Data: scikit-learn digits, 8 x 8 grey upscaled (bilinear) to '
      f'{first.dataset.image_size} x {first.dataset.image_size} RGB, 1,437 training / 360 test '
      'images, no augmentation.',
      f'- Network: Figure 5 at width {first.model.width:g} (every layer\'s channels x '
      f'{first.model.width:g}), 10 classes; BN over groups of {first.model.bn_group_size} '
      f'examples; batch {batch}; SGD momentum {first.momentum:g}; '
      f'{first.num_train_steps} steps ({first.num_train_steps * batch / 1437:.1f} epochs).',
      '- The configs are `configs/<variant>.py:digits`: each variant\'s paper recipe, with the '
      'digits learning-rate base in place of the paper\'s 0.0015 (the same multiples, '
      'x1/x1/x5/x30/x5).',
      '',
      settings_table(list(runs.values())),
      '',
      f'- Figure 1 MLP: {mlp.HIDDEN} sigmoid units, binarised 8 x 8 digits, {mlp.BATCH} examples '
      f'per step, {without_bn.steps[-1]} steps, plain SGD at {mlp.LEARNING_RATE:g}, initial '
      f'weights N(0, {mlp.INIT_STD:g}^2), unit {mlp.UNIT} of the last hidden layer; '
      f'{train.format_seconds(mlp_wall_s)} for both networks.',
      '- Random numbers: JAX\'s `rbg` generator, which compiles faster on a CPU than the default '
      f'threefry. `python -m bn_inception.evaluate --workdir={output}/runs/<variant>` reads these '
      'checkpoints as they are; to train one further with `bn_inception.main`, set '
      '`JAX_DEFAULT_PRNG_IMPL=rbg`.',
      f'- Wall time: {train.format_seconds(wall_s)} in all (compilation included; the variants\' '
      'times are in the table above).',
      f'- Versions: Python {platform.python_version()}, JAX {jax.__version__}, '
      f'Flax {flax.__version__}, NumPy {np.__version__}.',
      '',
  ]
  return '\n'.join(out)


# ------------------------------------------------------------------------------------------------
# The demo.
# ------------------------------------------------------------------------------------------------
def run_demo(output: str = 'demo_output', quick: bool = False, steps: Optional[int] = None,
             stream=None, command: str = 'python scripts/demo.py') -> dict:
  """Runs everything, writes `output`; returns {'target', 'rows', 'ensemble', 'results'}.

  The previous demo's runs in `output` are replaced. On one device (the first): the miniature is
  one CPU's work, and its batch need not divide over several.
  """
  start = time.perf_counter()
  progress = Progress(len(VARIANTS), stream)
  devices = jax.devices()[:1]
  runs_dir = os.path.join(output, 'runs')
  shutil.rmtree(runs_dir, ignore_errors=True)
  os.makedirs(runs_dir)

  # Threefry's random-number programs dominate compiling the networks' initialisation on a CPU
  # (about 25 s against 5 s with 'rbg'). The checkpoints hold an rbg key; to resume one with
  # bn_inception.main, set JAX_DEFAULT_PRNG_IMPL=rbg.
  with quiet_absl(), jax.default_prng_impl('rbg'):
    mlp_steps = QUICK['mlp_steps'] if quick else MLP_STEPS
    mlp_every = QUICK['mlp_eval_every'] if quick else MLP_EVAL_EVERY
    progress.message(f'Figure 1: a 3-layer sigmoid MLP with and without BN, {mlp_steps} steps '
                     'each...')
    t = time.perf_counter()
    without_bn = mlp.train_mlp(False, mlp_steps, mlp_every)
    with_bn = mlp.train_mlp(True, mlp_steps, mlp_every)
    mlp_wall = time.perf_counter() - t

    runs = {}
    for index, (name, module) in enumerate(VARIANTS):
      config = variant_config(module, quick, steps)
      workdir = os.path.join(runs_dir, module)
      with progress.variant(index, name, workdir, config.num_train_steps, config.batch_size):
        runs[name] = run_variant(name, module, config, workdir, devices)

  members = [os.path.join(r.workdir, 'test.npz') for r in runs.values() if r.config.model.use_bn]
  _, ensemble_rows = ensemble.ensemble_files(members, output=os.path.join(output, 'ensemble.npz'))
  target, rows = figure3({name: r.curve for name, r in runs.items()})
  plot_figure2(list(runs.values()), target, rows, os.path.join(output, 'figure2_accuracy.png'))
  plot_figure1(without_bn, with_bn, os.path.join(output, 'figure1_mlp.png'))
  text = results_markdown(runs, target, rows, ensemble_rows, without_bn, with_bn,
                          time.perf_counter() - start, mlp_wall, command, output)
  results = os.path.join(output, 'results.md')
  with open(results, 'w') as f:
    f.write(text)
  progress.message(f'Done in {train.format_seconds(time.perf_counter() - start)}. Results, '
                   f'figures and checkpoints: {os.path.abspath(output)}/ (results.md)')
  return {'target': target, 'rows': rows, 'ensemble': ensemble_rows, 'results': results}
