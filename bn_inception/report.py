r"""Did my runs reproduce the paper? Figures 2 and 3 from any runs of this project.

  python -m bn_inception.report WORKDIR [WORKDIR ...] [--output=DIR] [--window=3] [--baseline=WORKDIR]
      [--predictions=FILE.npz ...]

Reads each run's metrics.jsonl (the evaluations training logs as it goes) and config.json, finished
or still training, names its variant from its config, and writes into --output:

  report.md    Figure 3's table computed from the runs (paper steps of 32 images to reach the
               baseline's best accuracy, maximum accuracy and when), beside each row the paper's
               numbers for that variant and the ratio of steps, and whether the run has trained far
               enough to say
  figure2.png  test accuracy against paper steps, one curve per run (Figure 2), with the target
               and each run's first crossing

and, for the predictions files of --predictions (bn_inception.evaluate's, ensemble's), a row per
file and evaluation set: top-1/top-5 on the original labels beside the paper's for the same crops,
ReaL's where the set has them, ImageNet-V2's on its own labels.

The target is robust to evaluation noise: the baseline's best moving average over `window`
consecutive evaluations; a run reaches it when its own moving average does, the same rule for every
run (the baseline included), so no single lucky evaluation decides. With several baseline runs
(seeds) the target is the lowest of their best averages, so that every baseline run reaches it.

A variant is named by comparing the run's config with `configs/<variant>.py` at the run's scale on
the fields in which the paper's five variants differ (learning rate, BN, nonlinearity, dropout, LRN,
L2, decay, shuffling, distortions); the training length, batch size, width, seed and data may
differ. A run that matches none (another recipe, an ensemble member) is shown by its workdir.
"""

import dataclasses
import importlib
import json
import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import ml_collections
import numpy as np

from bn_inception import cli
from bn_inception import errors
from bn_inception import predictions
from bn_inception import run_dir

# (paper name, config module), in the order of the paper's Figure 3.
VARIANTS = (
    ('Inception', 'inception'),
    ('BN-Baseline', 'bn_baseline'),
    ('BN-x5', 'bn_x5'),
    ('BN-x30', 'bn_x30'),
    ('BN-x5-Sigmoid', 'bn_x5_sigmoid'),
)
BASELINE = 'Inception'  # the paper's target is its maximum (Figure 3)
WINDOW = 3  # evaluations per moving average (the target and every crossing)
PLATEAU_FRACTION = 1 / 4  # plateaued: the last quarter of a run brought no new best
LENGTH_FIELDS = ('paper_steps', 'num_train_steps')  # a run may be shorter or longer than planned


@dataclasses.dataclass(frozen=True)
class PaperRow:
  steps_to_target: Optional[float]  # paper steps to 72.2%; None: never reached it
  max_accuracy: float


# The paper's Figure 3 ([BN] arXiv:1502.03167v3, Fig. 3; ../shared/paper.md section 4.1): single-
# crop ImageNet validation top-1. Its text rounds BN-x5's 31.0 / 2.1 = 14.8 to "14 times fewer".
PAPER_TARGET = 0.722
PAPER_FIGURE3 = {
    'Inception': PaperRow(31.0e6, 0.722),
    'BN-Baseline': PaperRow(13.3e6, 0.727),
    'BN-x5': PaperRow(2.1e6, 0.730),
    'BN-x30': PaperRow(2.7e6, 0.748),
    'BN-x5-Sigmoid': PaperRow(None, 0.698),
}
PAPER_SOURCE = ('the paper\'s Figure 3 (Ioffe & Szegedy 2015, arXiv:1502.03167v3; '
                '`../shared/paper.md` section 4.1): single-crop top-1 on the 50,000 ImageNet '
                'validation images')
# The paper's Figure 4 (ImageNet validation, original labels): (top-1, top-5) by crops and models.
PAPER_FIGURE4 = {('center', 1): (0.748, 0.9218), ('144', 1): (0.7801, 0.9418),
                 ('144', 6): (0.799, 0.951)}


# ------------------------------------------------------------------------------------------------
# Runs: metrics.jsonl and config.json of a workdir.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  workdir: str
  config: ml_collections.ConfigDict
  variant: Optional[str]  # the paper's name, None when the config matches none
  steps: np.ndarray  # paper steps of the evaluations, increasing
  top1: np.ndarray  # test top-1 at those steps
  trained: int  # paper steps trained so far (the last logged step)
  planned: int  # paper steps the run is configured for
  eval_examples: Optional[int]  # examples per evaluation
  config_changes: list[str] = dataclasses.field(default_factory=list)  # resumed under another
  label: str = ''  # how tables and legends name it (set by label_runs)

  @property
  def eval_setting(self) -> tuple:
    """What an accuracy was measured on: data set, split, crops, image size, examples."""
    d = self.config.get('dataset', {})
    return (d.get('name'), d.get('eval_split'), d.get('eval_crops'), d.get('image_size'),
            self.eval_examples)


def read_metrics(workdir: str) -> list[dict]:
  """metrics.jsonl's records in order. A line still being written (no newline yet) is left for
  later. A run resumed from an earlier checkpoint logs its steps again: the records it writes
  replace everything logged after that checkpoint, which that run never continued."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise errors.NotFoundError(
        f'{workdir} has no metrics.jsonl: it is not the --workdir of a bn_inception.main run, or '
        'its training has not logged anything yet. Name the workdirs that training writes into '
        '(each holds config.json, metrics.jsonl and checkpoints/).')
  with open(path) as f:
    text = f.read()
  order = lambda m: (m['step'], 'eval_top1' in m)  # a step's training log, then its evaluation
  records = []
  for number, line in enumerate(text[:text.rfind('\n') + 1].splitlines(), 1):
    if not line.strip():
      continue
    try:
      m = json.loads(line)
    except json.JSONDecodeError as e:
      raise errors.InputFileError(f'{path}, line {number}, is not JSON ({e}): {line[:80]!r}') from e
    while records and order(records[-1]) >= order(m):  # resumed: drop what it did not continue
      records.pop()
    records.append(m)
  return records


def paper_step(record: dict, batch_size: int) -> int:
  return record.get('paper_step', record['step'] * batch_size // run_dir.PAPER_BATCH)


def read_run(workdir: str) -> Run:
  """One workdir, finished or still training; refuses one without metrics or config."""
  records = read_metrics(workdir)
  config = run_dir.read_config(workdir)
  if not records:
    raise errors.InputFileError(f'{workdir}/metrics.jsonl is empty: training has not logged a step yet.')
  evals = [m for m in records if 'eval_top1' in m]
  batch = config.batch_size
  return Run(
      workdir=workdir, config=config, variant=variant_of(config),
      steps=np.array([paper_step(m, batch) for m in evals], dtype=np.int64),
      top1=np.array([m['eval_top1'] for m in evals], dtype=np.float64),
      trained=max(paper_step(m, batch) for m in records),
      planned=config.num_train_steps * batch // run_dir.PAPER_BATCH,
      eval_examples=int(evals[-1]['eval_examples']) if evals else None,
      config_changes=config_changes(workdir))


def config_changes(workdir: str) -> list[str]:
  """'from paper step P: learning_rate 0.045 -> 0.01' for each resume under a changed config
  (a new num_train_steps alone is how a run is extended, not a change of recipe)."""
  history = run_dir.read_config_history(workdir)
  out = []
  for (_, old), (step, new) in zip(history, history[1:]):
    changed = {k: v for k, v in run_dir.diff(old, new).items() if k != 'num_train_steps'}
    if changed:
      out.append(f'from step {step:,} (paper step '
                 f'{fmt_steps(step * old["batch_size"] // run_dir.PAPER_BATCH)}): '
                 + ', '.join(f'{k} {a} -> {b}' for k, (a, b) in changed.items()))
  return out


def variant_configs(scale: str) -> dict[str, ml_collections.ConfigDict]:
  """{paper name: configs/<module>.py at `scale`}; configs/ is the checkout's, beside the library."""
  try:
    importlib.import_module('configs.default')
  except ModuleNotFoundError:
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return {name: importlib.import_module(f'configs.{module}').get_config(scale)
          for name, module in VARIANTS}


def flat(config: ml_collections.ConfigDict) -> dict:
  """{'model.width': 1.0, ...}: the config's fields by their dotted names."""
  def fields(node: dict, prefix: str):
    for key, value in node.items():
      if isinstance(value, dict):
        yield from fields(value, f'{prefix}{key}.')
      else:
        yield prefix + key, value
  return dict(fields(config.to_dict(), ''))


def same(a, b) -> bool:
  """Equal; numbers to rounding (0.0015 * 5 is 0.0075 on the command line)."""
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return bool(np.isclose(a, b, rtol=1e-9, atol=0))
  return a == b


def variant_of(config: ml_collections.ConfigDict) -> Optional[str]:
  """The paper variant whose config `config` is, on the fields in which the five differ."""
  scale = config.get('scale')
  if scale is None:
    return None
  try:
    candidates = {name: flat(c) for name, c in variant_configs(scale).items()}
  except ValueError:  # a scale the configs do not know
    return None
  keys = sorted(set.union(*(set(c) for c in candidates.values())) - set(LENGTH_FIELDS))
  defining = [k for k in keys if any(not same(c.get(k), candidates[BASELINE].get(k))
                                     for c in candidates.values())]
  run = flat(config)
  matches = [name for name, c in candidates.items()
             if all(same(run.get(k), c.get(k)) for k in defining)]
  return matches[0] if len(matches) == 1 else None


def paper_length(run: Run) -> tuple[int, str]:
  """(paper steps, whose): how long the paper trained this variant when the run is at the paper's
  scale (configs/<variant>.py), else how long the run itself is configured to train."""
  if run.variant is not None and run.config.get('scale') == 'imagenet':
    return variant_configs('imagenet')[run.variant].paper_steps, 'the paper\'s'
  return run.planned, 'its planned'


# ------------------------------------------------------------------------------------------------
# The robust target and the crossings: pure functions of the evaluation curves.
# ------------------------------------------------------------------------------------------------
def moving_average(steps: np.ndarray, top1: np.ndarray,
                   window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
  """(steps, averages): the mean of each `window` consecutive evaluations, at the last one's step.
  Empty while a run has fewer evaluations than `window`."""
  if len(top1) < window:
    return steps[:0], top1[:0]
  return steps[window - 1:], np.convolve(top1, np.ones(window) / window, mode='valid')


def first_reaching(steps: np.ndarray, values: np.ndarray, target: float) -> Optional[int]:
  """The first step whose value reaches `target`; None if none does."""
  hits = np.flatnonzero(values >= target)
  return int(steps[hits[0]]) if len(hits) else None


def best(steps: np.ndarray, values: np.ndarray) -> tuple[float, int]:
  """(maximum, the first step at which it was reached)."""
  i = int(np.argmax(values))
  return float(values[i]), int(steps[i])


def plateaued(steps: np.ndarray, values: np.ndarray, fraction: float = PLATEAU_FRACTION) -> bool:
  """Whether the last `fraction` of the run (in steps) brought no new best: the maximum was first
  reached at or before (1 - fraction) of the last step."""
  if len(values) == 0:
    return False
  return best(steps, values)[1] <= (1 - fraction) * steps[-1]


@dataclasses.dataclass
class Row:
  run: Run
  steps_to_target: Optional[int]  # paper steps at which its moving average first reached target
  max_accuracy: Optional[float]  # its best moving average; None before `window` evaluations
  max_step: Optional[int]


@dataclasses.dataclass
class Report:
  runs: list[Run]
  baseline: list[Run]  # the runs whose best accuracy is the target
  window: int
  target: Optional[float]  # None without a baseline run that has `window` evaluations
  baseline_steps: Optional[float]  # median over the baseline runs of their steps to target
  baseline_plateaued: bool  # every baseline run's moving average plateaued
  rows: list[Row]
  notes: list[str]  # what the reader must know: different data, provisional target, ...

  @property
  def baseline_name(self) -> str:
    """The baseline's variant (Inception unless --baseline chose others), for column headings."""
    variants = {r.variant for r in self.baseline}
    return variants.pop() if len(variants) == 1 and None not in variants else 'Baseline'


def averaged(run: Run, window: int) -> tuple[np.ndarray, np.ndarray]:
  return moving_average(run.steps, run.top1, window)


def figure3(runs: Sequence[Run], window: int = WINDOW,
            baseline: Optional[Sequence[Run]] = None) -> Report:
  """Figure 3 from the runs. `baseline`: the runs whose best accuracy is the target (default: the
  Inception runs among `runs`)."""
  baseline = [r for r in runs if r.variant == BASELINE] if baseline is None else list(baseline)
  ready = [r for r in baseline if len(r.top1) >= window]
  target = min(best(*averaged(r, window))[0] for r in ready) if ready else None
  rows = []
  for r in runs:
    steps, values = averaged(r, window)
    top, top_step = best(steps, values) if len(values) else (None, None)
    crossing = first_reaching(steps, values, target) if target is not None else None
    rows.append(Row(r, crossing, top, top_step))
  baseline_steps = (float(np.median([first_reaching(*averaged(r, window), target)
                                     for r in ready])) if ready else None)
  is_plateau = bool(ready) and all(plateaued(*averaged(r, window)) for r in ready)
  return Report(list(runs), baseline, window, target, baseline_steps, is_plateau, rows,
                notes(runs, baseline, ready, window, is_plateau))


def notes(runs, baseline, ready, window, is_plateau) -> list[str]:
  out = []
  if not baseline:
    out.append(f'No {BASELINE} run among these workdirs, so no target: name the baseline\'s '
               'workdir among them, or choose another run as the baseline with --baseline.')
  elif not ready:
    out.append(f'The baseline has fewer than {window} evaluations: no target yet.')
  elif not is_plateau:
    out.append('The target may still rise: the baseline\'s best moving average is in the last '
               f'{PLATEAU_FRACTION:.0%} of its run, so it had not stopped improving (the paper '
               f'trained {BASELINE} until its accuracy stopped improving, 31.0M steps). Steps to '
               'the target are provisional.')
  settings = {}
  for r in runs:
    settings.setdefault(r.eval_setting, []).append(r.label or r.workdir)
  if len(settings) > 1:
    described = '; '.join(
        f'{", ".join(names)}: {name} {split}, crops {crops}, {size} x {size}, {n} examples'
        for (name, split, crops, size, n), names in settings.items())
    out.append(f'**The runs were evaluated on different data or crops**, so their accuracies are '
               f'not measured alike and the target does not mean the same for all: {described}.')
  intervals = {int(np.median(np.diff(r.steps))) for r in runs if len(r.steps) > 1}
  if len(intervals) > 1:
    out.append(f'The runs were evaluated at different intervals ({", ".join(map(fmt_steps, sorted(intervals)))} '
               f'paper steps): a moving average over {window} evaluations spans a different '
               'number of steps in each.')
  for r in runs:
    if r.config_changes:
      out.append(f'{r.label or r.workdir} was resumed under a changed config (the table names its '
                 f'variant by the newest): {"; ".join(r.config_changes)}.')
  silent = [r.label or r.workdir for r in runs if len(r.top1) < window]
  if silent:
    out.append(f'Fewer than {window} evaluations yet, so no moving average: {", ".join(silent)}.')
  return out


def label_runs(runs: Sequence[Run]) -> None:
  """Names for tables and legends: the variant, with the seed (or the workdir) where several runs
  share it; a run of no paper variant by its workdir."""
  for r in runs:
    same_variant = [o for o in runs if o.variant == r.variant]
    seeds = {o.config.get('seed') for o in same_variant}
    if r.variant is None:
      r.label = r.workdir
    elif len(same_variant) == 1:
      r.label = r.variant
    elif len(seeds) == len(same_variant):
      r.label = f'{r.variant} seed {r.config.get("seed")}'
    else:
      r.label = f'{r.variant} ({r.workdir})'


def order(runs: Sequence[Run]) -> list[Run]:
  """The paper's order of variants (runs of none last), workdirs in the given order within each."""
  rank = {name: i for i, (name, _) in enumerate(VARIANTS)}
  return sorted(runs, key=lambda r: rank.get(r.variant, len(VARIANTS)))


# ------------------------------------------------------------------------------------------------
# report.md
# ------------------------------------------------------------------------------------------------
def pct(x: Optional[float]) -> str:
  return '–' if x is None else f'{100 * x:.1f}%'


def fmt_steps(steps: Optional[float]) -> str:
  """Paper steps as the paper writes them: 31.0M, 2.1M; smaller counts in full (1,250)."""
  if steps is None:
    return 'never'
  return f'{steps / 1e6:.1f}M' if steps >= 1e6 else f'{int(round(steps)):,}'


def ratio(numerator: Optional[float], denominator: Optional[float]) -> str:
  if numerator is None or denominator is None:
    return '–'
  return f'{numerator / denominator:.1f}x'


def far_enough(row: Row) -> str:
  """Whether the run has trained far enough to say if (and when) it reaches the target."""
  run = row.run
  length, whose = paper_length(run)
  if row.steps_to_target is not None:
    return 'yes: reached it'
  if run.trained >= length:
    return f'yes: not within {whose} {fmt_steps(length)} steps'
  return f'not yet: {fmt_steps(run.trained)} of {whose} {fmt_steps(length)} steps ({run.trained / length:.0%})'


def figure3_table(report: Report) -> list[str]:
  target = pct(report.target) if report.target is not None else 'the target'
  lines = [f'| Run | Steps to {target} | {report.baseline_name} / it | Max accuracy | at step '
           f'| Far enough to say? | Paper: steps to {pct(PAPER_TARGET)} | Paper: {BASELINE} / it | Paper: max |',
           '|---|---|---|---|---|---|---|---|---|']
  paper_baseline = PAPER_FIGURE3[BASELINE].steps_to_target
  for row in report.rows:
    paper = PAPER_FIGURE3.get(row.run.variant)
    paper_cells = ((fmt_steps(paper.steps_to_target), ratio(paper_baseline, paper.steps_to_target),
                    pct(paper.max_accuracy)) if paper else ('–', '–', '–'))
    lines.append('| ' + ' | '.join((
        row.run.label,
        fmt_steps(row.steps_to_target) if report.target is not None else '–',
        ratio(report.baseline_steps, row.steps_to_target),
        pct(row.max_accuracy),
        fmt_steps(row.max_step) if row.max_step is not None else '–',
        far_enough(row) if report.target is not None else '–',
    ) + paper_cells) + ' |')
  return lines


def spread(report: Report) -> list[str]:
  """Per variant with several runs: the range over its runs (seed-to-seed spread)."""
  out = []
  for name, _ in VARIANTS:
    rows = [r for r in report.rows if r.run.variant == name]
    if len(rows) < 2:
      continue
    steps = [r.steps_to_target for r in rows]
    maxima = [r.max_accuracy for r in rows if r.max_accuracy is not None]
    reached = sorted(s for s in steps if s is not None)
    text = f'{name} ({len(rows)} runs): steps to the target '
    text += (f'{fmt_steps(reached[0])}–{fmt_steps(reached[-1])}' if reached else 'never')
    if reached and len(reached) < len(steps):
      text += f' ({len(steps) - len(reached)} never)'
    if maxima:
      text += f', max accuracy {pct(min(maxima))}–{pct(max(maxima))}'
    out.append(text)
  return out


def markdown(report: Report) -> str:
  """Figure 3's section (and Figure 2's image) of report.md, for embedding elsewhere (the demo)."""
  w = report.window
  if report.target is not None:
    definition = (
        f'The target is **{pct(report.target)}**: the baseline\'s best moving average of test '
        f'top-1 over {w} consecutive evaluations (the lowest of the baseline runs\' bests, where '
        f'there are several). "Steps to" is the first evaluation at which a run\'s own {w}-'
        f'evaluation average reaches it, in paper steps of 32 images; "{report.baseline_name} / it" '
        f'divides the baseline\'s steps ({fmt_steps(report.baseline_steps)}'
        + (', the median over its runs' if len(report.baseline) > 1 else '') + ') by the run\'s. '
        f'"Max accuracy" is the run\'s best {w}-evaluation average, "at step" where it was first '
        f'reached. The baseline\'s moving average '
        + (f'had plateaued (no new best in the last {PLATEAU_FRACTION:.0%} of its run).'
           if report.baseline_plateaued else 'had not plateaued.'))
  else:
    definition = 'No target (below).'
  out = ['## Figure 3 from these runs', '', definition, '', *figure3_table(report), '',
         f'The paper\'s columns are {PAPER_SOURCE}; its ratios divide Inception\'s 31.0M steps by '
         'the variant\'s. "Far enough to say?": a run that has not reached the target has trained '
         'long enough to say so when it has reached the paper\'s length for its variant (ImageNet '
         'runs), or its own planned length (other data).', '']
  spreads = spread(report)
  if spreads:
    out += ['Spread over the runs of each variant (seeds): ' + '; '.join(spreads) + '.', '']
  out += [f'- {n}' for n in report.notes] + ([''] if report.notes else [])
  out += ['![Figure 2 from these runs](figure2.png)', '']  # plot_figure2 writes it beside
  return '\n'.join(out)


def runs_table(report: Report) -> list[str]:
  lines = ['| Run | Workdir | Evaluations | Trained (paper steps) | Planned | Evaluated on |',
           '|---|---|---|---|---|---|']
  for r in report.runs:
    name, split, crops, size, n = r.eval_setting
    lines.append(f'| {r.label} | `{r.workdir}` | {len(r.steps)} | {fmt_steps(r.trained)} | '
                 f'{fmt_steps(r.planned)} | {name} {split}, {crops} crop, {size} px, {n} '
                 'examples |')
  return lines


def evaluations_table(paths: Sequence[str]) -> list[str]:
  """A row per predictions file: its evaluation set, step, crops and scores; the paper's Figure 4
  only beside ImageNet's original validation labels (ReaL and ImageNet-V2 came after it)."""
  lines = ['| File | Evaluation set | Step | Crops | Models | Top-1 | Top-5 | ReaL top-1 '
           '| ReaL top-5 | Paper: top-1 | Paper: top-5 |', '|---|---|---|---|---|---|---|---|---|---|---|']
  for path in paths:
    p = predictions.load(path)
    acc = predictions.accuracy(p)
    models = len(p.meta.get('members', [])) or 1
    eval_set = p.eval_set or p.meta.get('dataset', '?')
    paper = (PAPER_FIGURE4.get((str(p.meta.get('crops')), models))
             if eval_set == 'imagenet2012' else None)
    real = ((pct(acc['real_top1']), pct(acc['real_top5']) + f' ({acc["real_left_out"]} left out)')
            if 'real_top1' in acc else ('–', '–'))
    lines.append('| ' + ' | '.join((
        f'`{path}`', eval_set, str(p.meta.get('step', '–')), str(p.meta.get('crops', '–')),
        str(models), pct(acc['top1']), pct(acc['top5']), *real,
        *((pct(paper[0]), pct(paper[1])) if paper else ('–', '–')))) + ' |')
  return lines


# ------------------------------------------------------------------------------------------------
# Figure 2
# ------------------------------------------------------------------------------------------------
def spans_decades(steps: np.ndarray) -> bool:
  """Whether evaluation steps span two decades or more: Figure 2 then uses a log-scale axis."""
  steps = steps[steps > 0]
  return len(steps) > 0 and steps.max() / steps.min() >= 100


def plot_figure2(report: Report, path: str) -> None:
  """Test top-1 against paper steps: each run's evaluations (dots) and moving average (line), the
  target (dotted) and each run's first crossing (star), in full and near the target (the paper's
  Figure 2 shows 0.4-0.8 around its 72.2%); log-scale steps when they span decades."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  near = report.target is not None
  fig, axes = plt.subplots(1, 2 if near else 1, figsize=(13 if near else 8, 5), dpi=110,
                           squeeze=False)
  axes = axes[0]
  # A colour per variant (the paper's order), a line style per run of it; runs of no variant apart.
  colors = {name: f'C{i}' for i, (name, _) in enumerate(VARIANTS)}
  styles = ('-', '--', ':', '-.')
  drawn: dict[str, int] = {}
  for row in report.rows:
    r = row.run
    key = r.variant or r.workdir
    color = colors.setdefault(key, f'C{len(colors) % 10}')
    style = styles[drawn.get(key, 0) % len(styles)]
    drawn[key] = drawn.get(key, 0) + 1
    for ax in axes:
      ax.plot(r.steps, r.top1, '.', color=color, alpha=0.35, markersize=4)
      ax.plot(*averaged(r, report.window), style, color=color, linewidth=1.4,
              label=r.label if ax is axes[-1] else None)
      if row.steps_to_target is not None:
        ax.plot([row.steps_to_target], [report.target], marker='*', markersize=12, color=color,
                markeredgecolor='black', zorder=3, linestyle='none')
  if near:
    for ax in axes:
      ax.axhline(report.target, color='gray', linestyle=':', linewidth=1,
                 label=(f'target {pct(report.target)} (stars: first reached)'
                        if ax is axes[-1] else None))
    top = max(float(r.top1.max()) for r in report.runs if len(r.top1))
    axes[1].set_ylim(report.target - 0.1, min(1.0, max(top, report.target) + 0.01))
    axes[1].set_title('near the target', fontsize=10)
  log = spans_decades(np.concatenate([r.steps for r in report.runs] + [np.zeros(0, np.int64)]))
  settings = {r.eval_setting for r in report.runs}
  name, split, _, _, n = next(iter(settings))
  axes[0].set_ylabel(f'test top-1 ({name} {split}, {n} examples)' if len(settings) == 1 else
                     'test top-1 (different data: see report)')
  axes[0].set_title('Figure 2 from these runs', fontsize=10)
  for ax in axes:
    if log:
      ax.set_xscale('log')
    ax.set_xlabel('paper steps (images / 32)')
    ax.grid(alpha=0.3)
  axes[-1].legend(loc='lower right', fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------
# The command.
# ------------------------------------------------------------------------------------------------
def read_runs(workdirs: Sequence[str]) -> list[Run]:
  """The workdirs' runs in the paper's order, labelled; refuses (errors.InputFileError) any that cannot be
  read, naming all of them at once."""
  runs, problems = [], []
  for w in workdirs:
    try:
      runs.append(read_run(w))
    except (OSError, ValueError) as e:
      problems.append(str(e))
  if problems:
    raise errors.InputFileError('\n'.join(problems))
  runs = order(runs)
  label_runs(runs)
  return runs


def write_report(workdirs: Sequence[str], output: str, window: int = WINDOW,
                 baseline: Optional[Sequence[str]] = None,
                 predictions_files: Sequence[str] = ()) -> Report:
  """Writes output/report.md and output/figure2.png for the runs in `workdirs`; returns the report.

  `baseline`: the workdirs whose runs set the target (default: the Inception runs among them);
  `predictions_files`: evaluations to list (evaluations_table).
  """
  if window < 1:
    raise errors.ConfigError(f'window must be at least 1, not {window}.')
  runs = read_runs(workdirs)
  chosen = None
  if baseline:
    unknown = [b for b in baseline if os.path.normpath(b) not in
               {os.path.normpath(r.workdir) for r in runs}]
    if unknown:
      raise errors.ConfigError(f'--baseline names workdirs that are not among those reported: {unknown}.')
    chosen = [r for r in runs if os.path.normpath(r.workdir) in map(os.path.normpath, baseline)]
  report = figure3(runs, window, chosen)
  evaluations = (['## Evaluations', '', *evaluations_table(predictions_files), '']
                 if predictions_files else [])
  os.makedirs(output, exist_ok=True)
  plot_figure2(report, os.path.join(output, 'figure2.png'))
  text = '\n'.join([
      '# Figures 2 and 3 of the paper from these runs', '',
      '`python -m bn_inception.report ' + ' '.join(workdirs) + '`', '',
      markdown(report), *evaluations, '## The runs', '', *runs_table(report), ''])
  with open(os.path.join(output, 'report.md'), 'w') as f:
    f.write(text)
  return report


def main(argv):
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError('Name the runs\' workdirs: python -m bn_inception.report WORKDIR ...')
  report = write_report(workdirs, FLAGS.output, FLAGS.window, FLAGS.baseline,
                        FLAGS.predictions or ())
  print('\n'.join(figure3_table(report)))
  for n in report.notes:
    print(f'Note: {n}')
  print(f'Wrote {os.path.join(FLAGS.output, "report.md")} and '
        f'{os.path.join(FLAGS.output, "figure2.png")}')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  flags.DEFINE_string('output', '.', 'Folder for report.md and figure2.png.')
  flags.DEFINE_integer('window', WINDOW, 'Evaluations per moving average (target and crossings).')
  flags.DEFINE_multi_string('baseline', None, 'Workdir(s) whose best accuracy is the target '
                            '(default: the Inception runs among the workdirs).')
  flags.DEFINE_multi_string('predictions', None, 'Predictions files (evaluate --output, ensemble '
                            '--output) to list, a row each with its evaluation set.')
  cli.run(main)
