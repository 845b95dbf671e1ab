"""Starting or joining Ray, once per process, and how loud Ray is.

``init_ray`` joins the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``) or starts a local Ray. Quiet
mode (every log level above DEBUG) turns Ray's own INFO records and progress bars off, in the driver and in
every worker, so that our own stage and progress lines are what a user reads; ``--log-level debug`` brings
all of Ray's output back. Measured on a small ``tailkd demo``: 2,094 lines before, 54 after.

A local Ray also runs its dashboard on a free loopback port, and every worker is told its address
(``RAY_API_SERVER_ADDRESS``): Ray Train's PlacementGroupCleaner asks the state API whether the run's controller
is alive. Without a dashboard it asked 127.0.0.1:8265, where nobody listened (a warning every second), or where
another Ray's dashboard answered "no such actor" and the cleaner removed a live run's placement group.

On a machine without CUDA, ``DS_ACCELERATOR=cpu`` (``deepspeed_env``) spares the driver and every local worker
DeepSpeed's "Setting accelerator to CPU" warning, which its import (through accelerate) printed once per process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import sys
import threading
import warnings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_LINES_REGEX = r"^(train|eval) step \d"  # what rank 0 prints (train.loop.progress_line, eval_line)
# Ray's core worker logs this for every actor whose constructor takes object-store references and may restart. Ray
# Data passes its map transformer and DataContext that way to every actor pool (whatever our arguments' size) and
# Ray Train its PreemptionWatcher's; both hold the references while the actors live, so a restart finds them: so
# the copies that other processes (Train's controller) forward to the driver are dropped in quiet mode; the driver's
# own, once per process, goes straight to its stderr, where no setting reaches it.
RAY_ACTOR_ARGS_NOTICE_REGEX = r"has constructor arguments in the object store and max_restarts > 0"
# The raylet warns when a node has started more Python workers than its physical cores (2 here): one run's trainer
# workers, teacher actor, Ray Data tasks and Train's controller exceed that on any small machine; harmless.
RAY_WORKER_COUNT_NOTICE_REGEX = r"PYTHON worker processes have been started on node"
# Ray Data's file listing (``ListFiles``, read_parquet) runs a thread pool whose completion signaler raises
# InterruptedError, unhandled, when the listing is cancelled: when a training stream stops at train.max_steps before
# the end of its epoch. Harmless (the listing was no longer wanted); Python prints the thread's traceback.
RAY_INTERRUPTED_THREAD_SUFFIX = "completion-signaler"


def configure_logging(level: str = "info") -> bool:
    """Our loggers at ``level`` (the CLI's ``--log-level`` / ``TAILKD_LOG_LEVEL``), other libraries' at WARNING or
    above unless ``level`` is debug, once; returns quiet mode
    (True unless ``level`` is debug). Ray's environment settings are exported here, before ray or
    transformers are imported by the command."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning or error")
    quiet = numeric > logging.DEBUG
    logging.basicConfig(format=LOG_FORMAT, datefmt="%H:%M:%S")
    # Other libraries' INFO records (absl's from rouge-score, transformers', ...) only at debug, as Ray's.
    logging.getLogger().setLevel(max(numeric, logging.WARNING) if quiet else numeric)
    logging.getLogger("tailkd_ray").setLevel(numeric)
    os.environ.update(ray_env(quiet))
    os.environ.update(deepspeed_env())
    if not os.environ.get("RAY_ADDRESS") and "ray" not in sys.modules:
        # A local Ray (init_ray) with token authentication asked for outright, which Ray turns on for a new local
        # cluster anyway, then announces in a warning. Ray reads it when imported: set after that, it would reach
        # the GCS of a local Ray started next but not this process's client, whose every call then fails
        # authentication. A user's own setting stands, and a cluster joined through RAY_ADDRESS keeps its own.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    return quiet


def ray_env(quiet: bool) -> dict[str, str]:
    """Environment for the driver and every Ray worker. Train's print patch doubles every print of a worker;
    Tune trials keep the workers' working directory (as Train workers do), so that relative data and model
    paths mean the same in a trial as in ``tailkd distill``. Ray's log deduplication would fold rank 0's progress
    and eval lines into one "[repeated Nx]" line (they differ only in numbers): they are exempt. Quiet mode drops
    Ray's notice about actor constructor arguments (``RAY_ACTOR_ARGS_NOTICE_REGEX``)."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "RAY_CHDIR_TO_TRIAL_DIR": "0",
           "RAY_DEDUP_LOGS_ALLOW_REGEX": WORKER_LINES_REGEX}
    if quiet:
        env.update(RAY_DATA_LOG_LEVEL="WARNING", RAY_DATA_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   RAY_DEDUP_LOGS_SKIP_REGEX=f"{RAY_ACTOR_ARGS_NOTICE_REGEX}|{RAY_WORKER_COUNT_NOTICE_REGEX}")
    return env


def deepspeed_env() -> dict[str, str]:
    """``DS_ACCELERATOR=cpu`` when this machine has no CUDA device and the user has not chosen an accelerator:
    DeepSpeed's own probe would find CPU too, but warns so in every process that imports it. Decided with torch,
    not by importing DeepSpeed, whose import is what prints the warning."""
    import torch  # deferred: configure_logging runs before the command's heavy imports

    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return {}
    return {"DS_ACCELERATOR": "cpu"}


def quiet_worker_setup() -> None:
    """Ray's ``worker_process_setup_hook`` in quiet mode: what the environment cannot reach in a worker."""
    from ray.util.annotations import RayDeprecationWarning  # deferred, as every Ray import here (see init_ray)

    # Train V2 names this logger by its file path, so its "Reporting training result" lines escape LoggingConfig.
    logging.getLogger(importlib.util.find_spec("ray.train.v2._internal.execution.context").origin).setLevel(
        logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled" notices
    warnings.filterwarnings("ignore", category=RayDeprecationWarning)  # raised by Ray Train's own DataConfig
    threading.excepthook = _without_cancelled_listing_tracebacks(threading.excepthook)


def _without_cancelled_listing_tracebacks(hook):
    """``hook`` (threading.excepthook) but for the InterruptedError of a cancelled Ray Data listing
    (``RAY_INTERRUPTED_THREAD_SUFFIX``); every other thread's exception is still reported."""

    def excepthook(args):
        name = args.thread.name if args.thread is not None else ""
        if not (issubclass(args.exc_type, InterruptedError) and name.endswith(RAY_INTERRUPTED_THREAD_SUFFIX)):
            hook(args)

    return excepthook


def is_quiet() -> bool:
    """Quiet mode as configured for this process (``configure_logging``); quiet by default."""
    return logging.getLogger("tailkd_ray").getEffectiveLevel() > logging.DEBUG


def train_logging_config():
    """Ray Train's ``RunConfig(logging_config=...)`` for the controller and the training workers."""
    import ray.train  # deferred, as every Ray import here (see init_ray)

    return ray.train.LoggingConfig(log_level="WARNING" if is_quiet() else "INFO")


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, else start a local Ray; no-op when Ray is already up.

    Locally the CPU count is oversubscribed (at least 8 logical CPUs): trainer workers each hold a CPU for the
    whole run, and Ray Data's tokenizer and teacher stages need CPUs beside them, or they stall.
    """
    # Deferred: the CLI imports this module before configure_logging has exported Ray's environment settings,
    # which Ray reads when it is imported.
    import ray
    import ray.data

    quiet = is_quiet()
    env = ray_env(quiet)
    os.environ.update(env)  # the driver's side, also when Ray is already up (e.g. started by a test)
    if ray.is_initialized():
        return
    runtime_env = {"env_vars": env}
    if quiet:
        runtime_env["worker_process_setup_hook"] = quiet_worker_setup
    options = dict(logging_level=logging.WARNING if quiet else logging.INFO)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, **options)
    else:
        # A local Ray's workers share this machine's devices; a joined cluster's workers may have GPUs it lacks.
        local_env = deepspeed_env()
        os.environ.update(local_env)
        runtime_env["env_vars"].update(local_env)
        start_local_ray(runtime_env, num_cpus=max(8, os.cpu_count() or 1), **options)
    context = ray.data.DataContext.get_current()  # copied into every dataset built from here on
    context.enable_progress_bars = context.print_on_execution_start = not quiet
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def start_local_ray(runtime_env: dict, *, num_cpus: int, attempts: int = 3, **options) -> None:
    """A local Ray with ``num_cpus`` logical CPUs and its dashboard on a free loopback port, whose address its
    workers get through ``runtime_env`` (see the module doc); ``options`` go to ``ray.init``. The tests' shared Ray
    starts here too: without a dashboard, Train's placement-group cleaner finds no state API of its own and, beside
    another Ray on the machine, dies on "Found multiple active Ray instances"."""
    import ray  # deferred, as every Ray import here (see init_ray)

    for attempt in range(attempts):
        port = free_local_port()
        runtime_env["env_vars"]["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        try:
            # Only this Ray's workers get the address (runtime_env), never os.environ: the raylet of any later
            # local Ray started by this process would inherit it and its cleaner ask this (then dead, or
            # another Ray's) dashboard, which removes live placement groups.
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                     dashboard_host="127.0.0.1", dashboard_port=port, runtime_env=runtime_env, **options)
            return
        except Exception as error:  # another process took the port between probe and bind: try another one
            if "already" not in str(error) or attempt == attempts - 1:
                raise


def free_local_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
