r"""The GPU check: every measurement that needs a GPU, in one call, one JSON line per step.

  python3 scripts/gpu_check.py --out=$OUT                   # on the GPU machine (docs/benchmarks)
  python3 scripts/gpu_check.py --out=$OUT --only=flag_triton_gemm_off,optin_bn_fused
  python scripts/gpu_check.py --out=/tmp/smoke --smoke      # the same steps, tiny, on a CPU
  python scripts/gpu_check.py --report=results.jsonl        # the results as a markdown table
  python scripts/gpu_check.py --prepare_photos              # once, where TensorFlow is: .photos

Run from the repository root. Installs the wheels carried in .whl/ when a package the steps need is
missing (`make gpu-wheels` makes them). bn_inception/gpu_check.py has the steps and the details.
"""

import os
import sys
import tempfile

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bn_inception import gpu_check  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', None, 'Directory for results.jsonl and the logs ($OUT).')
_SMOKE = flags.DEFINE_bool('smoke', False, 'Every step at a tiny size, for a CPU.')
_ONLY = flags.DEFINE_list('only', None, 'Run only these steps (names as in results.jsonl).')
_BUDGET = flags.DEFINE_float('budget_s', 530, 'Seconds for all steps together; steps that would '
                             'start with less than %d s left are skipped.' % gpu_check.MIN_STEP_S)
_SCRATCH = flags.DEFINE_string('scratch', None, 'Working directory (default: a new temporary one).')
_REPORT = flags.DEFINE_string('report', None, 'Print the table of this results.jsonl and exit.')
_PHOTOS = flags.DEFINE_string('photos', gpu_check.PHOTOS, 'The photograph set of the feed step.')
_PREPARE_PHOTOS = flags.DEFINE_bool('prepare_photos', False, 'Prepare --photos (TensorFlow '
                                    'needed) and exit.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _REPORT.value:
    print(gpu_check.summary_table(gpu_check.read_results(_REPORT.value)))
    return
  if _PREPARE_PHOTOS.value:
    gpu_check.prepare_photos(_PHOTOS.value)
    return
  if not _OUT.value:
    raise app.UsageError('--out is required.')
  scratch = _SCRATCH.value or tempfile.mkdtemp(prefix='gpu_check_')
  try:
    steps = gpu_check.select(gpu_check.plan(_SMOKE.value, scratch, _PHOTOS.value), _ONLY.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  gpu_check.run(steps, _OUT.value, budget_s=_BUDGET.value, scratch=scratch)


if __name__ == '__main__':
  app.run(main)
