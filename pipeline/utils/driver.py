"""What a job's driver does first: go offline, join Ray (or start a loopback-only local one) and log with the
seconds elapsed since it started.

Every job calls :func:`offline_mode` before it imports torch, diffusers, transformers, open_clip or Ray (their
hub settings are read once, at import), then :func:`start_ray`, which passes the same settings to every Ray
worker of the job (``runtime_env`` ``env_vars``). Models and reward weights are only ever loaded from local
paths; these settings make any slip (a hub name in a config, a library's update check) fail at once instead
of hanging on a network that is not there.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

#: Environment variables that keep the libraries off the network. ``HF_HUB_OFFLINE`` covers huggingface_hub
#: and everything built on it (diffusers, transformers, open_clip's and timm's hub downloads); the others are
#: the libraries' own switches (older transformers/datasets, telemetry, huggingface_hub's update check, Ray's
#: usage-stats report).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DISABLE_TELEMETRY": "1",  # diffusers / transformers' older spelling
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

#: Where a local Ray instance binds (its node address, agents, metrics export, dashboard if any). Set this
#: environment variable to a routable address of the machine to let other machines reach a local instance.
NODE_IP_ENV = "PIPELINE_RAY_NODE_IP"
LOOPBACK = "127.0.0.1"

#: Set for a local instance only (a cluster keeps Ray's defaults): Ray Train's preemption watcher, an extra actor
#: started with every training run to follow node drains, has nothing to watch on one machine that starts and
#: stops its own Ray (docs/jobs.md, "Cost").
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

_LATE = ("huggingface_hub", "transformers", "diffusers", "open_clip", "timm", "datasets")


def offline_mode() -> dict[str, str]:
    """Set :data:`OFFLINE_ENV` in this process's environment (overriding any other value) and return it.

    Call it first in a job, before the model libraries are imported: huggingface_hub reads ``HF_HUB_OFFLINE``
    when it is imported. If one of them already is (a job's ``main()`` called from a test or a notebook), the
    environment is still set for the Ray workers and a warning says so.
    """
    late = [m for m in _LATE if m in sys.modules]
    os.environ.update(OFFLINE_ENV)
    if late:
        hub = sys.modules.get("huggingface_hub.constants")
        if hub is not None and not getattr(hub, "HF_HUB_OFFLINE", True):
            warnings.warn(f"offline_mode() called after {', '.join(late)} were imported with HF_HUB_OFFLINE unset; "
                          f"this process may still try the hub (the Ray workers will not)", RuntimeWarning, stacklevel=2)
    return dict(OFFLINE_ENV)


def joins_cluster() -> bool:
    """True when ``ray.init()`` will attach to an existing cluster: ``RAY_ADDRESS`` is set (as ``ray job
    submit`` does for its entrypoint) or the process is a submitted job's driver."""
    return bool(os.environ.get("RAY_ADDRESS")) or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def _submitted_env_vars() -> set[str]:
    """Env-var keys that the submitted job's own runtime_env sets (Ray refuses to merge a driver runtime_env
    that repeats one: those keep the submitter's value)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return set()
    try:
        env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return set()
    return set(env)


def ray_init_kwargs(num_cpus: int | None = None, node_ip_address: str | None = None) -> dict:
    """The ``ray.init`` arguments of :func:`start_ray` (separate so that tests can check them).

    Always: the offline variables as ``runtime_env`` ``env_vars`` (minus any the submitted job already sets),
    no dashboard, worker logs kept in Ray's log files. A local start also binds to ``node_ip_address``, else
    ``$PIPELINE_RAY_NODE_IP``, else ``127.0.0.1`` (dashboard host the same); joining a cluster passes none of
    the local-start arguments.
    """
    taken = _submitted_env_vars()
    env_vars = {k: v for k, v in OFFLINE_ENV.items() if k not in taken}
    kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": False, "include_dashboard": False}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if joins_cluster():
        return kwargs
    node_ip = node_ip_address or os.environ.get(NODE_IP_ENV) or LOOPBACK
    kwargs.update(num_cpus=num_cpus, _node_ip_address=node_ip, dashboard_host=node_ip)
    return kwargs


def start_ray(num_cpus: int | None = None, node_ip_address: str | None = None) -> None:
    """Join the cluster the job was submitted to, else start a local Ray (``num_cpus``) bound to loopback.

    A local instance gets node address ``127.0.0.1`` (``node_ip_address`` or ``$PIPELINE_RAY_NODE_IP``
    choose another), so every server it starts (GCS, raylet, workers, agents, metrics export and, if
    enabled, the dashboard) listens on loopback only. Joining a cluster (``RAY_ADDRESS`` set, or under
    ``ray job submit``) passes none of that. Every worker gets :data:`OFFLINE_ENV`; a local instance also
    :data:`LOCAL_ENV`. Also applies
    :func:`offline_mode` to this process, and keeps Ray's own output off the console (:func:`quiet_console`;
    the driver's ``ray`` loggers at WARNING; worker output stays in Ray's log files, ``log_to_driver=False``).
    """
    offline_mode()
    import ray

    kwargs = ray_init_kwargs(num_cpus, node_ip_address)
    if not joins_cluster():
        for key, value in LOCAL_ENV.items():  # Ray Train passes these on from the driver's environment
            os.environ.setdefault(key, value)
    # The driver's "ray" loggers print warnings and errors only (Ray's own processes keep their log files); a
    # notice at every start that says nothing to act on is dropped.
    kwargs.setdefault("logging_level", logging.WARNING)
    for name in _SILENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    loopback = kwargs.get("_node_ip_address") in (LOOPBACK, "localhost", "::1")
    if not loopback:
        ray.init(**kwargs)
    else:
        # ray.init turns a loopback node address into the machine's routable one ("remotely reachable") unless
        # Ray runs in its single-machine mode (ENABLE_RAY_CLUSTER false, the macOS/Windows default); that mode
        # changes nothing else for a driver, so hold it for the start only.
        from ray._private import ray_constants

        before = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            ray.init(**kwargs)
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = before
    quiet_console()
    from .progress import reset_clock

    reset_clock()  # the progress lines count seconds from here, as the jobs' ElapsedLog does


#: Driver loggers whose warnings are notices (token authentication enabled by default, at every local start).
_SILENT_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
#: Ray Data console warnings that only say what :func:`quiet_console` itself switched off.
_DATA_NOTICES = ("Progress bars disabled", "Progress bars for operators disabled")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_DATA_NOTICES)


def quiet_console() -> None:
    """Keep Ray Data's and the model libraries' progress output off this process's console.

    Ray Data: no progress bars (on a pipe they are status blocks of every operator, logged every few seconds),
    no "Starting execution" / "Execution plan" lines, no stats dump; its console handler shows warnings and
    errors only, while its log file (``<session>/logs/ray-data/``) keeps everything. The Hugging Face
    libraries' weight-loading bars are switched off unless ``HF_HUB_DISABLE_PROGRESS_BARS`` says otherwise.
    :func:`start_ray` calls it; a process that starts Ray itself may too. The jobs print their own progress
    (``pipeline/utils/progress.py``). Deprecation warnings that Ray's own modules raise about Ray's own calls
    (one per run from Ray Data's default ingest options) are not the user's to act on and are dropped."""
    import ray.data

    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.verbose_stats_logs = False
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
            if not any(isinstance(f, _DropNotices) for f in handler.filters):
                handler.addFilter(_DropNotices())
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()  # also read by transformers when it is imported later
        except ImportError:
            pass
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


class ElapsedLog:
    """``log(msg)`` prints ``[    42s] msg``; ``log.seconds`` is the time since it was made. It restarts the one
    clock the progress lines count from (``pipeline/utils/progress.py``), so every line of a job agrees."""

    def __init__(self) -> None:
        from .progress import reset_clock

        reset_clock()

    @property
    def seconds(self) -> float:
        from .progress import elapsed

        return elapsed()

    def __call__(self, msg: str) -> None:
        from .progress import emit

        emit(msg)
