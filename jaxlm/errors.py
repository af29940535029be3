"""The one base class of every error that means "the input is wrong" (see docs/architecture.md).

Every module raises a subclass that names its domain (ConfigError, CorpusError, RunError, ...);
its message names the field, file or flag, the value and the fix, in one line. Scripts catch
`UserError` alone and print that line (exit code 2) instead of a traceback.
"""


class UserError(ValueError):
  """Bad input (config, files, flags, run directories): one line naming what and how to fix it."""
