"""Runs one experiment: python launch.py --config experiments/NAME.py[:ARG] --workdir DIR [--devices N].

  --config.KEY=VALUE   override any config value (e.g. --config.mesh.layout=dp)
  --devices N          N virtual CPU devices (set before jax starts)
  --nosweep            an experiment with get_sweep() runs all its points, each in its own process,
                       and writes DIR/report.md (cgpt_jax/sweep.py); --nosweep runs get_config() alone
  --processes P        P local processes with N devices each, joined over 127.0.0.1 (supervised)
  --coordinator HOST:PORT --num_processes P --process_id I, or --distributed (from SLURM etc.)
                       one process per host of a cluster (cgpt_jax/distributed.py)
  --mode MODE          train (default; resumes from DIR's latest checkpoint), plan (compile ahead
                       of time from abstract shapes only -> DIR/plan.json; also --plan), eval
                       (sliding-window perplexity -> DIR/evals.jsonl), generate (-> DIR/samples.jsonl),
                       export_hf (GPT-2-format folder)

Exit codes: 0 success, 2 bad configuration or input (a message says what and how to fix it), 1 a bug.
"""
import os
import sys

# glibc hands XLA's large scratch buffers back to the OS after every step and page-faults them in
# again on the next: up to seconds of system time per step at d=768 (REFERENCE.md §5). Keeping them
# mapped needs the tunables in the environment at process start, so re-exec once with them set.
GLIBC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000"
if __name__ == "__main__" and "GLIBC_TUNABLES" not in os.environ:
  os.environ["GLIBC_TUNABLES"] = GLIBC_TUNABLES
  os.execv(sys.executable, [sys.executable, *sys.argv])

from absl import app, flags, logging  # noqa: E402  (after the re-exec above)
from ml_collections import config_flags  # noqa: E402

from cgpt_jax.errors import InputError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file with get_config(arg), as path.py[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, summary, checkpoints).")
_DEVICES = flags.DEFINE_integer("devices", 1, "Number of virtual CPU devices.", lower_bound=1)
_PLAN = flags.DEFINE_bool("plan", False, "Same as --mode=plan.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "plan", "eval", "generate", "export_hf"],
                          "What to do with the experiment and its workdir.")
_SWEEP = flags.DEFINE_bool("sweep", True, "If the experiment defines get_sweep(), run its points "
                           "(cgpt_jax/sweep.py); --nosweep runs its get_config() alone.")
# Several processes (cgpt_jax/distributed.py): P local children, or one process per host.
_PROCESSES = flags.DEFINE_integer("processes", 1, "Start this many local processes, each with "
                                  "--devices devices, joined over 127.0.0.1.", lower_bound=1)
_COORDINATOR = flags.DEFINE_string("coordinator", None, "HOST:PORT of process 0 (one process per "
                                   "host; with --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the cluster.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
_AUTO = flags.DEFINE_bool("distributed", False, "Join a cluster described by the scheduler's "
                          "environment (SLURM, Open MPI, TPU pods).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 20, "Seconds without a heartbeat after which "
                                  "a cluster process counts as dead and the others abort.",
                                  lower_bound=1)
_INIT_TIMEOUT = flags.DEFINE_integer("initialization_timeout", 120, "Seconds a cluster process "
                                     "waits for all the others to join.", lower_bound=1)
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer("shutdown_timeout", 30, "Seconds a finished cluster "
                                         "process waits for the others to finish.", lower_bound=1)
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  distributed = sys.modules.get("cgpt_jax.distributed")  # imported once processes may be joined
  (distributed.exit_process if distributed else sys.exit)(2)


def parse_flags(argv):
  """absl's parser, but a bad flag or a config file that rejects its argument exits 2, not 1."""
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, InputError) as e:  # get_config(arg) raises InputError for a bad arg
    fail(str(e))
  except (AttributeError, KeyError) as e:  # config_flags' answer to --config.NO_SUCH_KEY=...
    fail(f"unknown config key {e}: see base_config() in cgpt_jax/config.py for every key.")
  if len(rest) > 1:
    fail(f"unexpected arguments {rest[1:]}; overrides take the form --config.KEY=VALUE.")
  return rest


def run_sweep() -> bool:
  """Runs the experiment's sweep, one launch.py process per point, if it defines one."""
  from cgpt_jax import sweep  # no jax in this process: every point starts its own
  config_flag = flags.FLAGS["config"]
  path, _ = sweep.split_config_name(config_flag.config_filename)
  experiment = sweep.load_experiment(path)
  if not hasattr(experiment, "get_sweep"):
    return False
  if _PLAN.value or _MODE.value != "train":
    fail(f"{path} defines a sweep, whose points choose their own modes; drop --mode/--plan, or "
         "pass --nosweep to use its get_config() alone.")
  if _PROCESSES.value > 1 or _COORDINATOR.value or _AUTO.value:
    fail(f"{path} defines a sweep, whose points run one local process each; several processes per "
         "point are not supported. Drop --processes/--coordinator/--distributed, or pass --nosweep.")
  try:
    sweep.run(experiment, config_flag.config_filename, _WORKDIR.value,
              dict(config_flag.override_values), _DEVICES.value)
  except InputError as e:
    fail(str(e))
  return True


def join_processes() -> None:
  """A --processes parent runs its children and exits here; a cluster process joins the others."""
  from cgpt_jax import distributed
  try:
    cluster = distributed.check_flags(
        processes=_PROCESSES.value, coordinator=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, auto=_AUTO.value,
        mode="plan" if _PLAN.value else _MODE.value,
        timeouts=(_HEARTBEAT.value, _INIT_TIMEOUT.value, _SHUTDOWN_TIMEOUT.value))
    if _PROCESSES.value > 1:
      sys.exit(distributed.run_local(_PROCESSES.value, sys.argv))
    if cluster:
      distributed.initialize(cluster)
  except InputError as e:
    fail(str(e))


def main(_):
  if _SWEEP.value and run_sweep():
    return
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # jax logs every backend it fails to find at INFO
  import jax  # the device count must be set before any JAX operation
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  join_processes()  # before anything touches a device
  from cgpt_jax import inference, train

  cfg, workdir, mode = _CONFIG.value, _WORKDIR.value, "plan" if _PLAN.value else _MODE.value
  try:
    if mode == "plan":
      result = train.plan(cfg, workdir)
      print(f"plan: {result['params']:,} params, {result['flops_per_token']:,} FLOPs/token, "
            f"{result['memory_per_device_bytes']['total_bytes'] / 2**30:.2f} GiB per device "
            f"-> {workdir}/plan.json")
    elif mode == "eval":
      r = inference.evaluate(cfg, workdir)
      print(f"eval (step {r['step']}): loss {r['loss']:.4f}, perplexity {r['perplexity']:.3f} over "
            f"{r['tokens_scored']:,} tokens of {r['text']} (window {r['window']}, stride "
            f"{r['stride']}) -> {workdir}/evals.jsonl")
    elif mode == "generate":
      r = inference.generate(cfg, workdir)
      print(r["prompt"] + r["completion"])
    elif mode == "export_hf":
      print(f"exported -> {inference.export_hf(cfg, workdir)}")
    else:
      s = train.run(cfg, workdir)
      print(f"done: loss {s['final_loss']:.4f}, val loss {s['final_eval_loss']:.4f}, "
            f"{s['tokens_per_s']:,.0f} tokens/s, {s['step_ms']:.1f} ms/step, MFU {s['mfu']:.3f}, "
            f"compile {s['compile_s']:.1f} s, wall {s['train_wall_s']:.1f} s -> {workdir}")
  except InputError as e:
    fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
