"""The paper in miniature on a CPU, in minutes: what `make demo` (scripts/demo.py) runs.

The five variants of paper section 4.2.2 at the `:digits` scale of their own configs
(train.train_and_evaluate), under the paper's protocol (Figure 3):

  1. Inception, the baseline, trains until its test accuracy stops improving: until its moving
     average over report.WINDOW evaluations has had no new best for the last
     report.PLATEAU_FRACTION of its run (report.plateaued), within BASELINE_BUDGET steps.
  2. The target is its best moving average (report.figure3: the lowest over its seeds).
  3. Each other variant trains for the paper's length for it relative to Inception's (15M or 6M
     steps of 31M, configs/*.py), times the baseline's steps to the target; report.figure3 reads
     off where its own moving average first reaches the target, as the paper did (its BN-x30 went
     on to 6M steps after reaching the target at 2.7M).
  4. Every variant with each of SEEDS, for the spread.

Then it evaluates the BN runs' final checkpoints (evaluate.evaluate_checkpoint), ensembles them
(ensemble.ensemble_files), runs the Figure 1 experiment (mlp.py), and writes into one folder:

  results.md             the protocol, Figure 3's table, what the runs show claim by claim, settings
  report.md, figure2.png what `python -m bn_inception.report runs/*` writes (bn_inception/report.py:
                         Figure 3's table beside the paper's numbers; Figure 2)
  figure1_mlp.png        the sigmoid MLP with and without BN (Figure 1 a, b, c)
  runs/<variant>_seed<k>/ each run's workdir (checkpoints, config.json, metrics.jsonl), test.npz
  ensemble.npz           the ensemble's predictions

Every number in results.md comes from the run; the paper's appear only as the claims checked.
"""

import contextlib
import datetime
import importlib
import logging as std_logging
import math
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from typing import Sequence

from absl import logging
import flax
import jax
import ml_collections
import numpy as np

from bn_inception import benchmark
from bn_inception import ensemble
from bn_inception import evaluate
from bn_inception import mlp
from bn_inception import predictions
from bn_inception import report
from bn_inception import train

BASELINE = report.BASELINE
SEEDS = (0, 1)  # initialisation and data order
# Inception's first run and its cap, in (paper) steps of 32 images: at least the previous demo's
# length, at most about what the time allows.
BASELINE_FIRST, BASELINE_BUDGET = 600, 3000
MLP_STEPS, MLP_EVAL_EVERY = 50_000, 500  # the paper's Figure 1 length

# --quick: the whole pipeline at a size where compilation is nearly all the time (tests): one seed,
# a baseline extended once.
QUICK = dict(width=0.125, eval_every=5, baseline_first=15, baseline_budget=20, seeds=(0,),
             mlp_steps=2000, mlp_eval_every=200)


# ------------------------------------------------------------------------------------------------
# The protocol.
# ------------------------------------------------------------------------------------------------
def variant_config(module: str, seed: int, quick: bool = False) -> ml_collections.ConfigDict:
  """configs/<module>.py:digits with this seed, shrunk for --quick; checkpoints only where each
  call of train_to ends."""
  c = importlib.import_module(f'configs.{module}').get_config('digits')
  c.seed = seed
  if quick:
    c.model.width = QUICK['width']
    c.eval_every_steps = c.log_every_steps = QUICK['eval_every']
  c.checkpoint_every_steps = 10 ** 9
  return c


def eval_every(config: ml_collections.ConfigDict) -> int:
  """The evaluation interval in paper steps."""
  return config.eval_every_steps * config.batch_size // train.PAPER_BATCH


def train_to(config: ml_collections.ConfigDict, workdir: str, paper_steps: int,
             devices: Sequence) -> report.Run:
  """Trains the run in workdir up to `paper_steps`, resuming where it stopped (train.py continues
  exactly as one longer run would), and reads it back."""
  config.paper_steps = paper_steps  # num_train_steps follows
  train.train_and_evaluate(config, workdir, devices=list(devices))
  return report.read_run(workdir)


def train_baseline(config: ml_collections.ConfigDict, workdir: str, devices: Sequence,
                   first: int, budget: int) -> report.Run:
  """Trains until the run's moving average plateaus (report.plateaued) or for `budget` steps. Each
  extension is the shortest that could show the plateau: to the best's step / (1 - fraction)."""
  every, steps = eval_every(config), first
  while True:
    run = train_to(config, workdir, steps, devices)
    averages = report.averaged(run, report.WINDOW)
    if steps >= budget or report.plateaued(*averages):
      return run
    needed = report.best(*averages)[1] / (1 - report.PLATEAU_FRACTION)
    steps = min(budget, max(steps + every, every * math.ceil(needed / every)))


def race_length(variant: str, baseline_steps: float, every: int) -> int:
  """The paper's training length for `variant` relative to Inception's (configs at ImageNet scale)
  times the miniature baseline's steps to the target, in whole evaluation intervals, at least one
  moving average's."""
  paper = report.variant_configs('imagenet')
  steps = baseline_steps * paper[variant].paper_steps / paper[BASELINE].paper_steps
  return every * max(report.WINDOW, math.ceil(steps / every))


# ------------------------------------------------------------------------------------------------
# Progress: one status line while the runs train.
# ------------------------------------------------------------------------------------------------
class Progress:
  """Which run, its step, its latest test accuracy and the time, on stderr.

  train_and_evaluate's loop cannot be hooked from outside and its absl log is silenced during the
  demo, but it appends to WORKDIR/metrics.jsonl as it goes: a thread polls that file. On a terminal
  the line is rewritten in place; otherwise a line is printed every `print_every_s` seconds.
  """

  def __init__(self, num_runs: int, stream=None, poll_s: float = 0.5, print_every_s: float = 30):
    self.stream = stream or sys.stderr
    self.tty = getattr(self.stream, 'isatty', lambda: False)()
    self.num_runs, self.poll_s, self.print_every_s = num_runs, poll_s, print_every_s
    self.start = time.perf_counter()
    self._lock = threading.Lock()

  def _write(self, text: str, final: bool) -> None:
    with self._lock:
      self.stream.write(('\r\x1b[K' if self.tty else '') + text +
                        ('\n' if final or not self.tty else ''))
      self.stream.flush()

  def message(self, text: str) -> None:
    self._write(text, final=True)

  def elapsed(self) -> str:
    return f'{train.format_seconds(time.perf_counter() - self.start)} elapsed'

  @contextlib.contextmanager
  def run(self, index: int, label: str, workdir: str, goal: str):
    """Shows `label`'s progress while the block trains it; `goal`: e.g. 'of 300'."""
    prefix = f'[{index + 1}/{self.num_runs}] {label}'

    def status() -> str:
      try:
        records = report.read_metrics(workdir)
      except FileNotFoundError:
        records = []
      evals = [m for m in records if 'eval_top1' in m]
      parts = [prefix, f'step {records[-1]["step"]} {goal}' if records else 'compiling']
      if evals:
        parts.append(f'test top-1 {100 * evals[-1]["eval_top1"]:.1f}%')
      return '  '.join(parts + [self.elapsed()])

    stop = threading.Event()

    def loop():
      last_print = time.perf_counter()
      while not stop.wait(self.poll_s):
        if self.tty:
          self._write(status(), final=False)
        elif time.perf_counter() - last_print >= self.print_every_s:
          self._write(status(), final=False)
          last_print = time.perf_counter()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()


@contextlib.contextmanager
def quiet_absl():
  """Only warnings from the library, none from Orbax (it warns about read-only managers)."""
  absl_logger = std_logging.getLogger('absl')  # filters here apply whichever handler prints
  ours = lambda record: 'orbax' not in record.pathname or record.levelno >= std_logging.ERROR
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  absl_logger.addFilter(ours)
  try:
    yield
  finally:
    absl_logger.removeFilter(ours)
    logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------
# Figure 1
# ------------------------------------------------------------------------------------------------
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
pct, fmt_steps = report.pct, report.fmt_steps


def verdict(shown: bool) -> str:
  return 'shown' if shown else 'not shown'


# Why a speed claim may not show on digits, and which setting would be expected to show it.
SATURATED = (
    'On digits the networks end within a few points of 100%, where one test image is 0.28 points: '
    'the target sits where the variants\' plateaus differ by a few images, so "reaching it" '
    'measures the height of a plateau as much as the speed of the climb (Figure 2 and the line on '
    'early training compare the speed). Expected to show it: a task the networks do not saturate, '
    'such as the paper\'s own (`configs/*.py` on ImageNet).')


def findings(rep: report.Report, lengths: dict[str, int], ensemble_rows: Sequence[dict],
             without_bn: mlp.Curves, with_bn: mlp.Curves) -> list[str]:
  """What these runs show about each of the paper's claims, computed from them; for a claim they do
  not show, the setting that would be expected to."""
  rows = {name: [r for r in rep.rows if r.run.variant == name] for name, _ in report.VARIANTS}
  target, base = rep.target, rep.baseline_steps
  out = []

  def crossings(name) -> str:
    return ', '.join(fmt_steps(r.steps_to_target) for r in rows[name])

  def all_within(name, limit) -> bool:
    return all(r.steps_to_target is not None and r.steps_to_target <= limit for r in rows[name])

  plateaus = '; '.join(
      f'{r.run.label}: {"plateaued" if report.plateaued(*report.averaged(r.run, rep.window)) else "stopped at its budget"} '
      f'after {fmt_steps(r.run.trained)} steps, best average {pct(r.max_accuracy)} at step '
      f'{fmt_steps(r.max_step)}' for r in rows[BASELINE])
  out.append(f'**The target.** {plateaus}. The target is {pct(target)}, reached by {BASELINE} '
             f'after {fmt_steps(base)} steps (the paper: 72.2% after 31.0M).')

  modified = lengths['BN-x5']
  at = lambda name, step: [float(r.run.top1[r.run.steps == step][0]) for r in rows[name]
                           if step in r.run.steps]
  early = ', '.join(f'{name} {"/".join(pct(a) for a in at(name, modified))}'
                    for name, _ in report.VARIANTS)
  faster_early = all(min(at(name, modified)) > max(at(BASELINE, modified))
                     for name in ('BN-Baseline', 'BN-x5'))
  out.append(f'**BN trains faster** (Figure 2; the paper\'s BN-x30 "trains somewhat slower '
             f'initially"). Test top-1 at step {fmt_steps(modified)}, the modified variants\' '
             f'whole run (each seed): {early}. Every BN-Baseline and BN-x5 run above every '
             f'{BASELINE} run: {verdict(faster_early)}.')

  shown = all_within('BN-Baseline', base / 2)
  out.append(
      f'**BN-Baseline matches {BASELINE} in less than half the steps** (paper: 13.3M vs 31.0M). '
      f'Steps to {pct(target)}: {crossings("BN-Baseline")} (half of {BASELINE}\'s: '
      f'{fmt_steps(base / 2)}; it trained {fmt_steps(lengths["BN-Baseline"])}, the paper\'s 15M '
      f'of 31M): {verdict(shown)}.' + ('' if shown else ' ' + SATURATED))

  shown = all_within('BN-x5', base)
  ratios = ', '.join(report.ratio(base, r.steps_to_target) for r in rows['BN-x5'])
  out.append(
      f'**BN-x5 needs 14 times fewer steps than {BASELINE}.** Steps to {pct(target)}: '
      f'{crossings("BN-x5")}, within its {fmt_steps(modified)} (the paper\'s 6M of 31M; ratio '
      f'{ratios}; the paper 14.8x): {verdict(shown)}.' + ('' if shown else ' ' + SATURATED))

  first = lambda name: statistics.mean(float(r.run.top1[0]) for r in rows[name])
  best = lambda name: statistics.mean(r.max_accuracy for r in rows[name])
  slower_start, higher = first('BN-x30') < first('BN-x5'), best('BN-x30') > best('BN-x5')
  out.append(
      f'**BN-x30 starts slower than BN-x5 but ends higher** (paper: 74.8% vs 73.0%). First '
      f'evaluation (step {fmt_steps(rows["BN-x5"][0].run.steps[0])}), mean over seeds: BN-x30 '
      f'{pct(first("BN-x30"))}, BN-x5 {pct(first("BN-x5"))}; best averages over their equal runs '
      f'{pct(best("BN-x30"))} vs {pct(best("BN-x5"))}. Slower start {verdict(slower_start)}; '
      f'higher maximum {verdict(higher)}.' + ('' if higher else
          ' The paper\'s BN-x30 pulled ahead late, after its learning rate had decayed over 150 '
          'epochs; these runs last ' + f'{modified * train.PAPER_BATCH / 1437:.0f} epochs.'))

  sig = rows['BN-x5-Sigmoid']
  trains = all(r.max_accuracy > 0.5 for r in sig)
  below = all(r.steps_to_target is None for r in sig)
  out.append(
      f'**BN-x5-Sigmoid trains, but stays below {BASELINE}** (paper: 69.8%, never 72.2%). Best '
      f'averages {", ".join(pct(r.max_accuracy) for r in sig)}; steps to {pct(target)}: '
      f'{crossings("BN-x5-Sigmoid")}. Trains: {verdict(trains)}; stays below: {verdict(below)}.'
      + ('' if below else ' Ten digit classes leave a sigmoid BN network capacity to spare; the '
         'paper\'s gap is on 1000-class ImageNet at full width.') +
      ' (A sigmoid network without BN, which the paper says stays at chance, is the MLP below.)')

  members, combined = ensemble_rows[:-1], ensemble_rows[-1]
  best_member = max(members, key=lambda r: r['top1'])
  out.append(
      f'**An ensemble beats its members** (paper: 6 BN-x30 variants, 144 crops). The {len(members)} '
      f'BN runs\' final checkpoints averaged: {pct(combined["top1"])} top-1; best member '
      f'{best_member["name"].split("/")[0]} {pct(best_member["top1"])}: '
      f'{verdict(combined["top1"] > best_member["top1"])}.' + (
          '' if combined['top1'] > best_member['top1'] else
          ' The paper\'s members were six runs of its best recipe; these are different variants '
          'of different lengths, and 360 test images are few.'))

  k = min(1, len(without_bn.steps) - 1)  # the first evaluation after training started
  at_step = lambda c, i: '/'.join(f'{x:.2f}' for x in c.sigmoid_input[i])
  change = lambda c: float(np.mean(np.abs(c.sigmoid_input[-1] - c.sigmoid_input[k])))
  faster = with_bn.test_accuracy[k] > without_bn.test_accuracy[k]
  stable = change(with_bn) < change(without_bn)
  out.append(
      f'**Figure 1: BN trains the sigmoid MLP faster and keeps its inputs\' distribution stable.** '
      f'Test accuracy at step {without_bn.steps[k]}: {pct(with_bn.test_accuracy[k])} with BN, '
      f'{pct(without_bn.test_accuracy[k])} without; at step {without_bn.steps[-1]}: '
      f'{pct(with_bn.test_accuracy[-1])} vs {pct(without_bn.test_accuracy[-1])}. The 15/50/85th '
      f'percentiles of the unit\'s sigmoid input went from {at_step(with_bn, k)} (step '
      f'{with_bn.steps[k]}) to {at_step(with_bn, -1)} with BN, from {at_step(without_bn, k)} to '
      f'{at_step(without_bn, -1)} without: a mean change of {change(with_bn):.2f} against '
      f'{change(without_bn):.2f}. Faster: {verdict(faster)}; more stable: {verdict(stable)}.' + (
          '' if faster and stable else
          ' The paper\'s run had MNIST\'s 60,000 training images; expected to show with more '
          'data than digits\' 1,437.'))
  return out


def protocol(rep: report.Report, lengths: dict[str, int], first: int, budget: int,
             seeds: Sequence[int]) -> list[str]:
  w, every = rep.window, eval_every(rep.runs[0].config)
  return [
      f'- **{BASELINE}** (the baseline) trains until its test accuracy stops improving: until its '
      f'moving average over {w} evaluations (every {every} steps) has had no new best for the '
      f'last {report.PLATEAU_FRACTION:.0%} of its run, checked after {fmt_steps(first)} steps and '
      f'after each extension, within {fmt_steps(budget)} steps. The paper trained it until its '
      'accuracy stopped improving (31.0M steps).',
      f'- **The target** is its best {w}-evaluation average, the lowest over its seeds; a run '
      f'reaches it when its own {w}-evaluation average does.',
      f'- **The others** train for the paper\'s length for them relative to {BASELINE}\'s (BN-'
      f'Baseline 15M, the modified variants 6M, of 31M) times the baseline\'s '
      f'{fmt_steps(rep.baseline_steps)} steps to the target: '
      + ', '.join(f'{name} {fmt_steps(n)}' for name, n in lengths.items())
      + ' steps. Where each first reached the target is read off its curve, as the paper read '
      'BN-x30\'s 2.7M before training it to 6M.',
      f'- **Seeds** {", ".join(map(str, seeds))} for every variant (initialisation and data '
      'order).',
      '- Chosen before these runs: the window, the target\'s rule, the seeds, the others\' lengths '
      f'(the paper\'s). Chosen after two exploratory {BASELINE} runs of 2,500 steps (seeds 0, 1), '
      f'to fit the time: the plateau fraction ({report.PLATEAU_FRACTION:.0%}; a third did not stop '
      'either run within 2,500 steps) and the cap.',
  ]


def settings_table(rep: report.Report, wall: dict[str, float]) -> list[str]:
  lines = ['| run | LR per 32 images | decay x0.96 every | L2 | dropout | LRN | steps | wall time '
           '| img/s |', '|---|---|---|---|---|---|---|---|---|']
  for r in rep.runs:
    c = r.config
    rates = [m['img_per_s'] for m in report.read_metrics(r.workdir) if 'img_per_s' in m]
    lines.append(
        f'| {r.label} | {c.learning_rate:g} | {c.lr_decay_epochs:.3g} epochs | {c.weight_decay:g} '
        f'| {c.model.dropout_rate:g} | {"yes" if c.model.lrn else "no"} | {fmt_steps(r.trained)} '
        f'| {train.format_seconds(wall[r.workdir])} | '
        f'{statistics.median(rates) if rates else float("nan"):.0f} |')
  return lines


def machine() -> str:
  device = jax.devices()[0]
  cpu = benchmark.cpu_model()
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  return f'{cores} CPU cores ({cpu}), JAX device: {device.platform} ({device.device_kind})'


def results_markdown(rep: report.Report, lengths: dict[str, int], first: int, budget: int,
                     seeds: Sequence[int], ensemble_rows: Sequence[dict],
                     without_bn: mlp.Curves, with_bn: mlp.Curves, wall: dict[str, float],
                     wall_s: float, mlp_wall_s: float, command: str, output: str) -> str:
  c = rep.runs[0].config
  load = ', '.join(f'{x:.1f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else '?'
  combined = ensemble_rows[-1]
  out = [
      '# BN-Inception in miniature: results of this run',
      '',
      f'`{command}`, {datetime.date.today().isoformat()}, {machine()}; load average at the end '
      f'{load}.',
      '',
      '## The paper\'s protocol, in miniature',
      '',
      *protocol(rep, lengths, first, budget, seeds),
      '',
      report.markdown(rep),
      f'The ensemble of the {len(ensemble_rows) - 1} BN runs\' final checkpoints (mean of '
      f'probabilities, `evaluate` on the last checkpoints): {pct(combined["top1"])} top-1.',
      '',
      '## What the runs show, claim by claim',
      '',
      *[f'- {f}' for f in findings(rep, lengths, ensemble_rows, without_bn, with_bn)],
      '',
      '![Figure 1](figure1_mlp.png)',
      '',
      '## Settings',
      '',
      f'- Data: scikit-learn digits, 8 x 8 grey upscaled (bilinear) to {c.dataset.image_size} x '
      f'{c.dataset.image_size} RGB, 1,437 training / 360 test images, no augmentation.',
      f'- Network: Figure 5 at width {c.model.width:g} (every layer\'s channels x '
      f'{c.model.width:g}), 10 classes; BN over groups of {c.model.bn_group_size} examples; batch '
      f'{c.batch_size} (a step is {c.batch_size / train.PAPER_BATCH:g} paper step'
      f'{"s" if c.batch_size != train.PAPER_BATCH else ""}); SGD momentum {c.momentum:g}.',
      '- The configs are `configs/<variant>.py:digits`: each variant\'s paper recipe, with the '
      'digits learning-rate base in place of the paper\'s 0.0015 (the same multiples, '
      'x1/x1/x5/x30/x5); only the length and the seed are set here.',
      '',
      *settings_table(rep, wall),
      '',
      f'- Figure 1 MLP: {mlp.HIDDEN} sigmoid units, binarised 8 x 8 digits, {mlp.BATCH} examples '
      f'per step, {without_bn.steps[-1]} steps, plain SGD at {mlp.LEARNING_RATE:g}, initial '
      f'weights N(0, {mlp.INIT_STD:g}^2), unit {mlp.UNIT} of the last hidden layer; '
      f'{train.format_seconds(mlp_wall_s)} for both networks.',
      '- Random numbers: JAX\'s `rbg` generator, which compiles faster on a CPU than the default '
      f'threefry. `python -m bn_inception.evaluate --workdir={output}/runs/<run>` reads these '
      'checkpoints as they are; to train one further with `bn_inception.main`, set '
      '`JAX_DEFAULT_PRNG_IMPL=rbg`.',
      f'- Wall time: {train.format_seconds(wall_s)} in all (compilation included; each run\'s is '
      'in the table above).',
      f'- Versions: Python {platform.python_version()}, JAX {jax.__version__}, '
      f'Flax {flax.__version__}, NumPy {np.__version__}.',
      '',
  ]
  return '\n'.join(out)


# ------------------------------------------------------------------------------------------------
# The demo.
# ------------------------------------------------------------------------------------------------
def run_demo(output: str = 'demo_output', quick: bool = False, stream=None,
             command: str = 'python scripts/demo.py') -> dict:
  """Runs everything, writes `output`; returns {'report', 'lengths', 'ensemble', 'results'}.

  The previous demo's runs in `output` are replaced. On one device (the first): the miniature is
  one CPU's work, and its batch need not divide over several.
  """
  start = time.perf_counter()
  seeds = QUICK['seeds'] if quick else SEEDS
  first = QUICK['baseline_first'] if quick else BASELINE_FIRST
  budget = QUICK['baseline_budget'] if quick else BASELINE_BUDGET
  progress = Progress(len(report.VARIANTS) * len(seeds), stream)
  devices = jax.devices()[:1]
  runs_dir = os.path.join(output, 'runs')
  shutil.rmtree(runs_dir, ignore_errors=True)
  os.makedirs(runs_dir)
  wall: dict[str, float] = {}
  lengths: dict[str, int] = {}

  def train_run(index, name, module, seed, goal, how):
    config = variant_config(module, seed, quick)
    workdir = os.path.join(runs_dir, f'{module}_seed{seed}')
    label = f'{name} seed {seed}'
    t = time.perf_counter()
    with progress.run(index, label, workdir, goal):
      run = how(config, workdir)
    wall[workdir] = time.perf_counter() - t
    return workdir, run, f'[{index + 1}/{progress.num_runs}] {label}: {fmt_steps(run.trained)} steps'

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

    # 1. The baseline, until its accuracy stops improving.
    baseline = []
    for seed in seeds:
      workdir, run, line = train_run(
          len(baseline), BASELINE, 'inception', seed, f'(until it plateaus, at most {budget})',
          lambda c, w: train_baseline(c, w, devices, first, budget))
      averages = report.averaged(run, report.WINDOW)
      progress.message(f'{line}, {"plateaued" if report.plateaued(*averages) else "at its cap"}; '
                       f'best {report.WINDOW}-evaluation average {pct(report.best(*averages)[0])}, '
                       f'{progress.elapsed()}')
      baseline.append(workdir)
    target = report.figure3(report.read_runs(baseline))
    progress.message(f'The target: {pct(target.target)}, reached by {BASELINE} after '
                     f'{fmt_steps(target.baseline_steps)} steps.')

    # 2. The others, for the paper's length relative to Inception's.
    workdirs = list(baseline)
    for name, module in report.VARIANTS[1:]:
      every = eval_every(variant_config(module, 0, quick))
      lengths[name] = race_length(name, target.baseline_steps, every)
      for seed in seeds:
        workdir, run, line = train_run(
            len(workdirs), name, module, seed, f'of {lengths[name]}',
            lambda c, w, n=lengths[name]: train_to(c, w, n, devices))
        steps, averages = report.averaged(run, report.WINDOW)
        reached = report.first_reaching(steps, averages, target.target)
        progress.message(f'{line}, ' + (f'reached {pct(target.target)} at step {reached}'
                                        if reached is not None else
                                        f'did not reach {pct(target.target)}') +
                         f', {progress.elapsed()}')
        workdirs.append(workdir)

    # 3. The BN runs' final checkpoints, evaluated and ensembled.
    members = []
    for workdir in workdirs[len(baseline):]:
      p = evaluate.evaluate_checkpoint(report.read_run(workdir).config, workdir,
                                       mesh=train.make_mesh(list(devices)))
      members.append(os.path.join(workdir, 'test.npz'))
      predictions.save(members[-1], p)
  _, ensemble_rows = ensemble.ensemble_files(members, output=os.path.join(output, 'ensemble.npz'))

  rep = report.write_report(workdirs, output)
  plot_figure1(without_bn, with_bn, os.path.join(output, 'figure1_mlp.png'))
  text = results_markdown(rep, lengths, first, budget, seeds, ensemble_rows, without_bn, with_bn,
                          wall, time.perf_counter() - start, mlp_wall, command, output)
  results = os.path.join(output, 'results.md')
  with open(results, 'w') as f:
    f.write(text)
  progress.message(f'Done in {train.format_seconds(time.perf_counter() - start)}. Results, '
                   f'figures and checkpoints: {os.path.abspath(output)}/ (results.md)')
  return {'report': rep, 'lengths': lengths, 'ensemble': ensemble_rows, 'results': results}
