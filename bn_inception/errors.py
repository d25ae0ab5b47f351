"""Errors that are the user's to fix: a bad config or flag, a missing or damaged file, another run's
workdir. Their messages say what is wrong and what to do; the command-line entry points
(`cli.run`) print them as one message, without a Python traceback (`--traceback` shows it).

Each also derives from the built-in exception it refines, so `except ValueError` still catches a
ConfigError.
"""


class UserError(Exception):
  """Bad input, explained by the message."""


class ConfigError(UserError, ValueError):
  """A config field or command-line flag whose value cannot work."""


class ConfigArgumentError(UserError):
  """An argument after a config file's colon (--config=FILE:ARGUMENT) that the file does not offer.
  Not a ValueError: ml_collections would fold a ValueError into absl's flag-parsing report, with
  the traceback."""


class InputFileError(UserError, ValueError):
  """A file given (or found) that is not what it should be: damaged, or another kind of file."""


class TrainingDivergedError(UserError, FloatingPointError):
  """Training met a non-finite loss, gradient, parameter or statistic; the message names the step
  and the last good checkpoint."""


class NotFoundError(UserError, FileNotFoundError):
  """A file, directory, checkpoint or data set that is not there."""


def describe(error: BaseException) -> str:
  """The type and first line of the exception at the root of `error`'s chain: what a library that
  wraps another's error (Orbax tensorstore's, which names the file) actually ran into, without the
  pages of detail some add."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'
