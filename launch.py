"""Runs one experiment:
python launch.py --config experiments/NAME.py[:ARG] --workdir DIR [--devices N].

  --config.KEY=VALUE   override any config value (e.g. --config.mesh.layout=dp)
  --devices N          N virtual CPU devices (set before jax starts)
  --nosweep            an experiment with get_sweep() runs all its points, each in its own process,
                       and writes DIR/report.md (cgpt_jax/sweep.py); --nosweep runs get_config()
                       alone
  --results FILE       a sweep also writes its report to FILE (docs/results/NAME.md), headed by the
                       command that regenerates it
  --processes P        P local processes with N devices each, joined over 127.0.0.1 (supervised)
  --coordinator HOST:PORT --num_processes P --process_id I, or --distributed (from SLURM etc.)
                       one process per host of a cluster (cgpt_jax/distributed.py)
  --mode MODE          train (default; resumes from DIR's latest checkpoint), plan (compile ahead
                       of time from abstract shapes only -> DIR/plan.json; also --plan), eval
                       (sliding-window perplexity -> DIR/evals.jsonl), generate
                       (-> DIR/samples.jsonl), export_hf (GPT-2-format folder), search (rank
                       every layout on --devices N for --hardware=h100|v5p within
                       --memory_budget_gb: prune, compile the --search_top_k most promising, each
                       in DIR/candidates/NAME/ -> DIR/search.json, report.md, pareto.png)

  --verbose            with an error raised by the experiment file itself, print its traceback too

Exit codes (README.md, "When things go wrong"):
  0    success
  1    a bug (a traceback)
  2    bad configuration or input: one line says what, where and how to fix it; nothing was written
  3    training diverged: a step's loss, gradients or parameters were not finite (the line names the
       step); the last finite state is saved, no non-finite state ever is
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM, after the current step and a checkpoint: rerun
       the same command to resume
"""

import os
import sys

from cgpt_jax import malloc  # noqa: E402  (imports nothing heavy)

if __name__ == "__main__":
  malloc.reexec_with_tuned_malloc()

import traceback  # noqa: E402

from absl import app, flags, logging  # noqa: E402  (after the re-exec above)
from ml_collections import config_flags  # noqa: E402

from cgpt_jax.errors import Diverged, InputError, Stopped  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment file with get_config(arg), as path.py[:arg].", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, summary, checkpoints).")
_DEVICES = flags.DEFINE_integer("devices", 1, "Number of virtual CPU devices.", lower_bound=1)
_PLAN = flags.DEFINE_bool("plan", False, "Same as --mode=plan.")
_MODE = flags.DEFINE_enum(
  "mode",
  "train",
  ["train", "plan", "eval", "generate", "export_hf", "search"],
  "What to do with the experiment and its workdir.",
)
_SWEEP = flags.DEFINE_bool(
  "sweep",
  True,
  "If the experiment defines get_sweep(), run its points "
  "(cgpt_jax/sweep.py); --nosweep runs its get_config() alone.",
)
_RESULTS = flags.DEFINE_string(
  "results",
  None,
  "A sweep also writes its report to this Markdown file (e.g. docs/results/NAME.md), headed by "
  "the command that regenerates it, with the plots it links copied beside it.",
)
# Several processes (cgpt_jax/distributed.py): P local children, or one process per host.
_PROCESSES = flags.DEFINE_integer(
  "processes",
  1,
  "Start this many local processes, each with --devices devices, joined over 127.0.0.1.",
  lower_bound=1,
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator",
  None,
  "HOST:PORT of process 0 (one process per host; with --num_processes and --process_id).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the cluster.")
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index in [0, num_processes)."
)
_AUTO = flags.DEFINE_bool(
  "distributed",
  False,
  "Join a cluster described by the scheduler's environment (SLURM, Open MPI, TPU pods).",
)
_HEARTBEAT = flags.DEFINE_integer(
  "heartbeat_timeout",
  20,
  "Seconds without a heartbeat after which a cluster process counts as dead and the others abort.",
  lower_bound=1,
)
_INIT_TIMEOUT = flags.DEFINE_integer(
  "initialization_timeout",
  120,
  "Seconds a cluster process waits for all the others to join.",
  lower_bound=1,
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
  "shutdown_timeout",
  30,
  "Seconds a finished cluster process waits for the others to finish.",
  lower_bound=1,
)
# --mode=search (cgpt_jax/search/, docs/search.md).
_HARDWARE = flags.DEFINE_string(
  "hardware", "h100", "Accelerator a search ranks layouts for: h100 or v5p (costs/roofline.py)."
)
_BUDGET = flags.DEFINE_float(
  "memory_budget_gb", None, "A search's memory per device in GB (default: the hardware's HBM)."
)
_TOP_K = flags.DEFINE_integer(
  "search_top_k",
  24,
  "Candidates a search compiles ahead of time, the most promising first.",
  lower_bound=1,
)
_SEARCH_TIME = flags.DEFINE_float(
  "search_time_budget", 3600, "Seconds a search may spend compiling its candidates, in all."
)
_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "With an error raised by the experiment file, also print its traceback."
)
flags.mark_flags_as_required(["config", "workdir"])
# Virtual CPU devices cost memory (about 0.3 MB each) and start-up time that grows with the square
# of their count (4096 take 20 s here); far beyond this, jax hangs for minutes while memory grows.
MAX_DEVICES = 4096
DEVICE_BYTES = 2**20  # what one virtual device is allowed, with room above those 0.3 MB


def fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  exit_process(code)


def exit_process(code: int) -> None:
  distributed = sys.modules.get("cgpt_jax.distributed")  # imported once processes may be joined
  (distributed.exit_process if distributed else sys.exit)(code)


def verbose(argv) -> bool:
  """--verbose, read from the command line: it is needed while the flags are being parsed."""
  flag = [
    a
    for a in argv
    if a.lstrip("-") in ("verbose", "noverbose") or a.lstrip("-").startswith("verbose=")
  ]
  return bool(flag) and flag[-1].lstrip("-") in (
    "verbose",
    "verbose=true",
    "verbose=True",
    "verbose=1",
  )


def config_path(argv) -> str | None:
  """The experiment file named by --config (without its :ARG)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  if not values:
    values = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
  if not values:
    return None
  path, sep, _ = values[-1].rpartition(":")
  return path if sep and path.endswith(".py") else values[-1]


def experiment_error(e: BaseException, path: str) -> BaseException | None:
  """The exception that the experiment file at `path` raised (loading it, or in get_config,
  get_sweep or report), if `e` is it or was raised while handling it."""
  target = os.path.realpath(path)
  while e is not None:
    if isinstance(e, SyntaxError) and e.filename and os.path.realpath(e.filename) == target:
      return e
    if any(os.path.realpath(f.filename) == target for f in traceback.extract_tb(e.__traceback__)):
      return e
    e = e.__cause__ or e.__context__
  return None


def fail_in_experiment(e: BaseException, path: str, argv) -> None:
  """One line naming the experiment file, the function and the exception (the traceback too with
  --verbose); the experiment's own InputError keeps its message."""
  if isinstance(e, InputError):
    fail(str(e))
  if verbose(argv):
    traceback.print_exception(e, file=sys.stderr)
  if isinstance(e, SyntaxError):
    where = f"{path}:{e.lineno}"
  else:
    frames = [
      f
      for f in traceback.extract_tb(e.__traceback__)
      if os.path.realpath(f.filename) == os.path.realpath(path)
    ]
    where = f"{path}:{frames[-1].lineno} (in {frames[-1].name})"
  message = str(e).splitlines()[0] if str(e) else ""
  fail(
    f"{where}: {type(e).__name__}: {message}. Fix the experiment file"
    f"{'' if verbose(argv) else ' (--verbose prints its traceback)'}."
  )


def parse_flags(argv):
  """absl's parser, but a bad flag, a missing experiment file or one that fails (or rejects its
  argument) exits 2 with one line, not 1 with a traceback."""
  path = config_path(argv)
  if path is not None and not os.path.isfile(path):
    what = "is not a file" if os.path.exists(path) else "does not exist"
    fail(
      f"--config {path} {what}. Give an experiment file, e.g. "
      "--config=experiments/shakespeare_char.py."
    )
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001  (sorted out below; anything else is re-raised)
    inner = experiment_error(e, path) if path else None
    if inner is not None:
      fail_in_experiment(inner, path, argv)
    if isinstance(e, (flags.Error, InputError)):
      fail(str(e))
    if isinstance(
      e, (AttributeError, KeyError)
    ):  # config_flags' answer to --config.NO_SUCH_KEY=...
      fail(f"unknown config key {e}: see base_config() in cgpt_jax/config.py for every key.")
    raise
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; overrides take the form --config.KEY=VALUE.")
  return rest


def check_devices(devices: int) -> None:
  """Before jax starts: a device count this host cannot hold would hang it for minutes."""
  available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  most = min(MAX_DEVICES, available // DEVICE_BYTES)
  if devices > most:
    fail(
      f"--devices={devices}: more virtual CPU devices than this host can hold (at most {most}: "
      f"{MAX_DEVICES} at best, and 1 MiB of the {available / 2**30:.1f} GiB of free memory "
      f"each). Use --devices<={most}."
    )


def run_sweep() -> bool:
  """Runs the experiment's sweep, one launch.py process per point, if it defines one."""
  from cgpt_jax import sweep  # no jax in this process: every point starts its own

  config_flag = flags.FLAGS["config"]
  path, _ = sweep.split_config_name(config_flag.config_filename)
  experiment = sweep.load_experiment(path)
  if not hasattr(experiment, "get_sweep"):
    if _RESULTS.value:
      fail(f"--results writes a sweep's report, and {path} defines no get_sweep(); drop --results.")
    return False
  if _PLAN.value or _MODE.value != "train":
    fail(
      f"{path} defines a sweep, whose points choose their own modes; drop --mode/--plan, or "
      "pass --nosweep to use its get_config() alone."
    )
  if _PROCESSES.value > 1 or _COORDINATOR.value or _AUTO.value:
    fail(
      f"{path} defines a sweep, whose points run one local process each; several processes per "
      "point are not supported. Drop --processes/--coordinator/--distributed, or pass --nosweep."
    )
  try:
    sweep.run(
      experiment,
      config_flag.config_filename,
      _WORKDIR.value,
      dict(config_flag.override_values),
      _DEVICES.value,
      _RESULTS.value,
    )
  except InputError as e:
    fail(str(e))
  except Exception as e:  # noqa: BLE001  (get_sweep or report failed: the experiment's error)
    inner = experiment_error(e, path)
    if inner is None:
      raise
    fail_in_experiment(inner, path, sys.argv)
  return True


def run_search(workdir: str) -> None:
  """--mode=search: this process lists, prunes and ranks; each candidate compiles in its own."""
  from cgpt_jax.search import runner

  config_flag = flags.FLAGS["config"]
  options = {
    "hardware": _HARDWARE.value,
    "budget_gb": _BUDGET.value,
    "top_k": _TOP_K.value,
    "time_budget_s": _SEARCH_TIME.value,
  }
  runner.run(
    _CONFIG.value,
    config_flag.config_filename,
    workdir,
    _DEVICES.value,
    dict(config_flag.override_values),
    options,
  )


def join_processes() -> None:
  """A --processes parent runs its children and exits here; a cluster process joins the others."""
  from cgpt_jax import distributed

  try:
    cluster = distributed.check_flags(
      processes=_PROCESSES.value,
      coordinator=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
      auto=_AUTO.value,
      mode="plan" if _PLAN.value else _MODE.value,
      timeouts=(_HEARTBEAT.value, _INIT_TIMEOUT.value, _SHUTDOWN_TIMEOUT.value),
    )
    if _PROCESSES.value > 1:
      sys.exit(distributed.run_local(_PROCESSES.value, sys.argv))
    if cluster:
      distributed.initialize(cluster)
  except InputError as e:
    fail(str(e))


def main(_):
  if not _WORKDIR.value:
    fail("--workdir is empty. Give the run's folder, e.g. --workdir=runs/shakespeare.")
  check_devices(_DEVICES.value)
  try:
    run(_CONFIG.value, _WORKDIR.value, "plan" if _PLAN.value else _MODE.value)
  except KeyboardInterrupt:  # Ctrl-C outside training (which saves and stops on its own)
    print("interrupted (SIGINT); nothing was saved by this command.", file=sys.stderr)
    exit_process(130)


def run(cfg, workdir: str, mode: str) -> None:
  if _RESULTS.value and not _SWEEP.value:
    fail("--results writes a sweep's report, which --nosweep does not run; drop one of them.")
  if _SWEEP.value and run_sweep():
    return
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # jax logs every backend it fails to find at INFO
  import jax  # the device count must be set before any JAX operation

  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  join_processes()  # before anything touches a device
  from cgpt_jax import run_modes
  from cgpt_jax.train import aot_plan, loop

  try:
    if mode == "search":
      run_search(workdir)
    elif mode == "plan":
      result = aot_plan.plan(cfg, workdir)
      print(
        f"plan: {result['params']:,} params, {result['flops_per_token']:,} FLOPs/token, "
        f"{result['memory_per_device_bytes']['total_bytes'] / 2**30:.2f} GiB per device "
        f"-> {workdir}/plan.json"
      )
    elif mode == "eval":
      r = run_modes.evaluate(cfg, workdir)
      print(
        f"eval (step {r['step']}): loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} over "
        f"{r['tokens_scored']:,} tokens of {r['text']} (window {r['window']}, stride "
        f"{r['stride']}) -> {workdir}/evals.jsonl"
      )
    elif mode == "generate":
      r = run_modes.generate(cfg, workdir)
      print(r["prompt"] + r["completion"])
    elif mode == "export_hf":
      print(f"exported -> {run_modes.export_hf(cfg, workdir)}")
    else:
      s = loop.run(cfg, workdir)
      if s:  # processes other than 0 that only finished a run have no summary
        print(
          f"done: loss {s['final_loss']:.4f}, val loss {s['final_eval_loss']:.4f}, "
          f"{s['tokens_per_s']:,.0f} tokens/s, {s['step_ms']:.1f} ms/step, MFU {s['mfu']:.3f}, "
          f"compile {s['compile_s']:.1f} s, wall {s['train_wall_s']:.1f} s -> {workdir}"
        )
  except InputError as e:
    fail(str(e))
  except Diverged as e:
    fail(str(e), e.exit_code)
  except Stopped as e:
    print(str(e), file=sys.stderr)
    exit_process(e.exit_code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
