"""Shared CLI plumbing for experiment scripts: config flags, multi-host init, clean errors."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from jaxlm import config as config_lib
from jaxlm.errors import UserError


def _flag_error(e: BaseException) -> None:
  """Prints a flag/override error as one line and exits 2."""
  while e.args and isinstance(e.args[0], BaseException):  # ml_collections nests KeyErrors
    e = e.args[0]
  text = str(e.args[0]) if e.args else str(e)
  if isinstance(e, AttributeError) and "attribute 'get_config'" in text:  # none in the file
    text = "the --config file defines no get_config(); see configs/default.py"
  elif isinstance(e, (AttributeError, KeyError)):  # ml_collections: an unknown config key
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    text = f"unknown config key '{_unknown_override(lines[0].strip(QUOTES))}'"
    text += "".join(f"; {line}" for line in lines[1:])  # (ml_collections' did-you-mean)
  elif not isinstance(e, _FLAG_ERRORS):  # the config file could not be read or run
    where = f" ({e.filename}, line {e.lineno})" if isinstance(e, SyntaxError) else ""
    text = f"the --config file cannot be loaded: {type(e).__name__}: {text}{where}"
  print(f"error: {' '.join(text.split())}", file=sys.stderr)
  sys.exit(2)


_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)
QUOTES = "'\""


def _unknown_override(name: str) -> str:
  """The full path of the --config.K=V override whose part `name` is unknown (ml_collections
  names only that part): among those naming it, the first that is no key of the schema."""
  paths = [arg[len("--config."):].split("=")[0] for arg in sys.argv[1:]
           if arg.startswith("--config.")]
  naming = [path for path in paths if name in path.split(".")]
  unknown = [path for path in naming if not _in_schema(path)]
  return (unknown or naming or [name])[0]


def _in_schema(path: str) -> bool:
  node: Any = config_lib.to_dict(config_lib.Config())
  for part in path.split("."):
    if not isinstance(node, dict) or part not in node:
      return False
    node = node[part]
  return True


def define_config_flag(default: str | None = "configs/default.py"):
  """The --config flag. ml_collections applies --config.K=V overrides while defining it, so a
  bad override surfaces here; it becomes one line on stderr instead of a traceback."""
  try:
    return _in_help(config_flags.DEFINE_config_file(
        "config", default, "ml_collections config file; override fields with --config.K=V."))
  except Exception as e:  # pylint: disable=broad-except  (a flag, or the config file's code)
    _flag_error(e)


def define_config_overrides_flag():
  """A --config flag holding the schema's defaults, for scripts that start from a run's saved
  config (fine-tuning): only the --config.K=V overrides matter (see `config_overrides`)."""
  try:
    holder = _in_help(config_flags.DEFINE_config_dict(
        "config", config_lib.default_config_dict(),
        "override fields of the run's config with --config.K=V (e.g. --config.model.lora_rank=8)"))
  except Exception as e:  # pylint: disable=broad-except  (a flag, or the config file's code)
    _flag_error(e)
  flags.FLAGS[holder.name].default_as_str = None  # (--help: the schema's values are not the run's)
  return holder


def config_overrides(flag_name: str = "config") -> dict[str, Any]:
  """{'section.key': value} of the --config.K=V overrides given on the command line."""
  return dict(config_flags.get_override_values(flags.FLAGS[flag_name]))


def config_value(holder) -> Any:
  """The --config value; a config file that cannot be loaded, or whose get_config() returns
  no ConfigDict, is a ConfigError (one line)."""
  path = config_flags.get_config_filename(flags.FLAGS[holder.name])
  try:
    value = holder.value  # a config file that failed to load raises only when first used
  except OSError as e:
    raise config_lib.ConfigError(
        f"config file {path} cannot be loaded ({str(e).splitlines()[-1].strip()}); pass "
        f"--config=configs/NAME.py.") from None
  except flags.IllegalFlagValueError:  # get_config() returned None
    value = None
  if not isinstance(value, ml_collections.ConfigDict):  # (--config.K=V needs one)
    raise config_lib.ConfigError(
        f"config file {path}: get_config() returned {type(value).__name__}, not an "
        f"ml_collections ConfigDict; return one, as the files in configs/ do.")
  return value


def _in_help(holder: flags.FlagHolder) -> flags.FlagHolder:
  """Lists a flag defined here in the script's --help (absl lists only the main module's)."""
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
  return holder


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing (for app.run), with bad values reported as one line, exit 2; --help
  (or -h) prints the script's flags and exits 0 (absl exits 1)."""
  argv = ["--help" if arg == "-h" else arg for arg in argv]
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    if e.code == 1 and any(arg.lstrip("-").split("=")[0] in _HELP_FLAGS for arg in argv[1:]):
      sys.exit(0)
    raise
  except Exception as e:  # pylint: disable=broad-except  (a flag, or the config file's code)
    _flag_error(e)


def define_distributed_flags() -> None:
  _in_help(flags.DEFINE_string(
      "coordinator_address", None,
      "host:port of process 0 for a multi-process job (jax.distributed)."))
  _in_help(flags.DEFINE_integer("num_processes", None, "number of processes in the job."))
  _in_help(flags.DEFINE_integer("process_id", None, "this process's index in the job."))


def log(message: str) -> None:
  """A progress line on stderr (stdout carries what the script produces)."""
  print(message, file=sys.stderr, flush=True)


def quiet_logs() -> None:
  """Orbax/TFDS log every save and read at INFO; show warnings only unless -v was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _cluster_detected() -> bool:
  """A multi-host TPU slice or a SLURM job of several tasks (what jax.distributed detects)."""
  tpu_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return ("," in tpu_hosts or int(os.environ.get("SLURM_NTASKS", "1")) > 1
          or "OMPI_COMM_WORLD_SIZE" in os.environ)


def maybe_initialize_distributed() -> None:
  """Joins a multi-process job: from flags, or auto-detected (TPU pods, SLURM, Open MPI)."""
  import jax
  values = flags.FLAGS
  if not (values.coordinator_address or values.num_processes) and _cluster_detected():
    jax.distributed.initialize()
  elif values.coordinator_address or values.num_processes:
    # CPU collectives across processes need gloo (ignored by TPU/GPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=values.coordinator_address,
                               num_processes=values.num_processes, process_id=values.process_id)


def config_file_dict(flag_name: str = "config") -> dict[str, Any]:
  """The config file's own values (before --config.K=V overrides)."""
  return config_lib.load_file(config_flags.get_config_filename(flags.FLAGS[flag_name]))


def define_restore_step_flag() -> flags.FlagHolder:
  """--restore_step: resume from a chosen checkpoint (pretraining and fine-tuning scripts)."""
  return _in_help(flags.DEFINE_integer(
      "restore_step", None, "resume from this checkpoint step instead of the newest valid one "
      "(the later ones are moved to checkpoints_discarded/).", lower_bound=0))


def define_finetune_flags(*, data: str, validation_data: str, test_data: str,
                          workdir: str = "new run directory.",
                          init: str = "run directory to start from (pretrained or imported)."
                          ) -> None:
  """The flags every fine-tuning script has (--init, --data, --validation_data, --test_data,
  --workdir, --progress, --restore_step, --config, the distributed ones), with the script's own
  help texts where they differ; `run_finetune` reads them."""
  _in_help(flags.DEFINE_string("init", None, init))
  _in_help(flags.DEFINE_string("data", None, data))
  _in_help(flags.DEFINE_string("validation_data", None, validation_data))
  _in_help(flags.DEFINE_string("test_data", None, test_data))
  _in_help(flags.DEFINE_string("workdir", None, workdir))
  _in_help(flags.DEFINE_bool("progress", True, "show a progress bar on stderr."))
  define_restore_step_flag()
  define_config_overrides_flag()
  define_distributed_flags()


def run_finetune(objective: str, overrides: dict[str, Any] | None = None) -> None:
  """The fine-tuning scripts' shared main: checks everything, trains, prints the summary. The
  scripts define the same flags (`define_finetune_flags`); they are read here. `overrides`:
  config values a script's own flags set (over --config.K=V)."""
  import json

  from jaxlm import finetune
  f = flags.FLAGS
  init, data, workdir = f.init, f.data, f.workdir
  missing = [name for name, value in (("--init", init), ("--data", data),
                                      ("--workdir", workdir)) if not value]
  if missing:
    raise finetune.FinetuneError(f"{', '.join(missing)} required: --init=RUN (the run to start "
                                 f"from), --data=FILE, --workdir=NEW_RUN.")
  maybe_initialize_distributed()
  prepared = finetune.prepare(init, workdir, objective, data,
                              {**config_overrides(), **(overrides or {})},
                              f.validation_data or "", f.test_data or "")
  summary = finetune.finetune(prepared, show_progress=f.progress, restore_step=f.restore_step)
  import jax
  if jax.process_index() == 0:
    print(json.dumps(summary))


def exit_on_user_error(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Prints a user error as `error: <message>` on stderr and exits 2 (no traceback); so is a
  device running out of memory (XLA's RESOURCE_EXHAUSTED), which a preflight cannot always
  foresee (generation and evaluation batches, fragmentation)."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless out of memory)
      jax = sys.modules.get("jax")  # (not imported here: --help stays fast)
      if not (jax and isinstance(e, jax.errors.JaxRuntimeError)
              and "RESOURCE_EXHAUSTED" in str(e)):
        raise
      print(f"error: the device ran out of memory ({' '.join(str(e).split())[:200]}); lower "
            f"the batch size or sequence length (--batch_size, --seq_len, "
            f"--config.train.global_batch_size or raise --config.train.microbatches, "
            f"--config.finetune.max_length) or spread the model over more devices "
            f"(--config.mesh.fsdp).", file=sys.stderr)
      sys.exit(2)
  return wrapped
