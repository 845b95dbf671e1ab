"""Where teacher actors and trainer workers run, and a fail-fast check that the cluster can host them.

Placement is driven by Ray custom resources. The cluster configs in ``cluster/`` start inference nodes
with ``tailkd_inference: <GPUs of the node>`` and training nodes with ``tailkd_training: <GPUs>``; a job
config asks for them with ``teacher.resources: {tailkd_inference: 1}`` and
``train.resources_per_worker: {tailkd_training: 1}``, so Ray schedules teacher actors only on inference
nodes and trainer workers only on training nodes. The head node offers ``CPU: 0`` and no custom resource,
so no work lands there.

A request that no node can satisfy does not fail in Ray: it waits forever as "pending". On a fixed-size
cluster that is a silent hang, so ``require_placement`` checks the alive nodes first and raises
``PlacementError`` naming what is missing. On an autoscaling cluster nodes appear on demand and there is no
public API that lists the node types the autoscaler could add, so the check only logs what it is waiting
for (``allow_autoscale=True``, set by the top-level config key ``autoscaling``).

Stages that run at the same time share the nodes: a run's trainer workers, its teacher actors and Ray Data's
tasks each fit alone and may still not fit together (8 trainer workers on a local Ray of 8 logical CPUs leave
none for the teacher actor, which waits forever). ``require_together`` checks a phase's ``Demand`` s each on its
own (per node) and their sum per resource against the alive nodes' totals: both are necessary conditions, so it
never refuses what could be placed, and catches the over-subscription that would hang.

Every Ray call that places teacher actors or trainer workers takes its resources from
``teacher_ray_options`` / ``train_worker_resources`` here, so the check and the request cannot disagree.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import ray

from tailkd_ray.config import TeacherConfig, TrainConfig
from tailkd_ray.errors import PlacementError  # re-exported: callers import it from here too

log = logging.getLogger(__name__)

# Ray Data reserves 1 CPU per map actor unless num_cpus is given, GPU actors included
# (ray.data ... map_operator._canonicalize_ray_remote_args). We leave it at that default rather than
# pass num_cpus next to num_gpus, which Ray Data logs as "experimental".
TEACHER_ACTOR_CPUS = 1.0
# Ray Train reserves 1 CPU per CPU worker and, for GPU workers, 1 GPU and no CPU. We write both out
# because a resources_per_worker dict replaces Ray Train's CPU default instead of adding to it.
CPU_TRAIN_WORKER = {"CPU": 1.0}
GPU_TRAIN_WORKER = {"GPU": 1.0}
# Ray Data's tasks (reads, filters, the split) take 1 CPU each; they finish and release it, so one CPU beside the
# actors and workers keeps a pipeline moving. The tokenizer pool starts at 1 actor of 1 CPU (data/pack.py).
DATA_TASK_CPUS = 1.0
TOKENIZER_ACTOR_CPUS = 1.0

# Per-node resources Ray adds by itself; they say nothing about what a node is for.
_IMPLICIT_RESOURCES = ("memory", "object_store_memory")
_EPS = 1e-6  # Ray accounts resources in units of 1e-4; this only absorbs float rounding in the division


@dataclass(frozen=True)
class Demand:
    """``count`` units of ``unit`` (Ray resources) that one stage holds while it runs. ``hint`` says what to change
    when the stage alone does not fit; ``lever`` names the config key that sets ``count`` (None: fixed)."""

    what: str
    unit: dict
    count: int
    hint: str = ""
    lever: Optional[str] = None


def teacher_demand(teacher: TeacherConfig) -> Demand:
    """The teacher actor pool at its smallest: ``teacher.min_actors`` actors must fit at once."""
    unit = _unit(TEACHER_ACTOR_CPUS, teacher.num_gpus, teacher.resources)
    return Demand("teacher actors", unit, teacher.min_actors, lever=f"teacher.min_actors (now {teacher.min_actors})",
                  hint=(f"add an inference node (cluster/README.md), or change teacher.resources (now "
                        f"{_format(teacher.resources)}) / teacher.num_gpus (now {teacher.num_gpus:g}), or lower "
                        f"teacher.min_actors (now {teacher.min_actors})"))


def trainer_demand(train: TrainConfig) -> Demand:
    """The trainer: ``train.num_workers`` workers must fit at once."""
    return Demand("trainer workers", train_worker_resources(train), train.num_workers,
                  lever=f"train.num_workers (now {train.num_workers})",
                  hint=(f"add a training node (cluster/README.md), or change train.resources_per_worker (now "
                        f"{_format(train.resources_per_worker)}) / train.use_gpu (now {str(train.use_gpu).lower()}), "
                        f"or lower train.num_workers (now {train.num_workers})"))


def data_task_demand() -> Demand:
    """Ray Data's tasks of a running pipeline (see ``DATA_TASK_CPUS``)."""
    return Demand("Ray Data task", {"CPU": DATA_TASK_CPUS}, 1)


def tokenizer_demand() -> Demand:
    """The tokenizer actor pool at its smallest (one actor; it grows to data.tokenizer_actors when CPUs are free)."""
    return Demand("tokenizer actor", {"CPU": TOKENIZER_ACTOR_CPUS}, 1)


def teacher_ray_options(teacher: TeacherConfig) -> dict:
    """``map_batches`` keyword arguments that place one teacher actor: ``num_gpus`` and ``resources``.

    Keys without a value are left out so Ray Data keeps its own defaults (1 CPU per actor).
    """
    options: dict = {}
    if teacher.num_gpus:
        options["num_gpus"] = teacher.num_gpus
    if teacher.resources:
        options["resources"] = dict(teacher.resources)
    return options


def train_worker_resources(train: TrainConfig) -> dict:
    """``ScalingConfig.resources_per_worker`` for one trainer worker: CPU or GPU plus custom resources.

    ``{"GPU": 1, **train.resources_per_worker}`` with ``train.use_gpu``, else ``{"CPU": 1, ...}``; an explicit
    CPU or GPU amount in ``train.resources_per_worker`` wins.
    """
    base = GPU_TRAIN_WORKER if train.use_gpu else CPU_TRAIN_WORKER
    return {**base, **train.resources_per_worker}


def require_teacher_placement(teacher: TeacherConfig, *, allow_autoscale: bool,
                              nodes: Optional[list[dict]] = None) -> None:
    """``require_together`` for the teacher actor pool alone."""
    require_together([teacher_demand(teacher)], allow_autoscale=allow_autoscale, nodes=nodes)


def require_train_placement(train: TrainConfig, *, allow_autoscale: bool,
                            nodes: Optional[list[dict]] = None) -> None:
    """``require_together`` for the trainer alone."""
    require_together([trainer_demand(train)], allow_autoscale=allow_autoscale, nodes=nodes)


def require_placement(*, resources: dict, num_gpus: float, num_cpus: float, count: int, what: str,
                      allow_autoscale: bool = False, hint: str = "",
                      nodes: Optional[list[dict]] = None) -> None:
    """``require_together`` for ``count`` units of ``{CPU: num_cpus, GPU: num_gpus, **resources}`` (zero amounts
    dropped; ``resources`` may itself carry CPU or GPU, which then win)."""
    require_together([Demand(what, _unit(num_cpus, num_gpus, resources), count, hint)],
                     allow_autoscale=allow_autoscale, nodes=nodes)


def require_together(demands: list[Demand], *, allow_autoscale: bool, nodes: Optional[list[dict]] = None,
                     phase: str = "") -> None:
    """Raise ``PlacementError`` unless the alive nodes can host every demand of a phase at once.

    Each demand alone: a node of total resources R hosts ``min_k floor(R_k / unit_k)`` units, the cluster the sum
    over nodes (a stage may span nodes). Together: per resource, the demands' sum must not exceed the nodes' total.
    Totals, not what is free now: work that holds resources today releases them later, a node that lacks them
    never gets them. ``phase`` (e.g. "training") starts the message.

    ``nodes`` defaults to ``ray.nodes()`` of the connected cluster (dead nodes are skipped). With
    ``allow_autoscale`` nothing is raised: a shortfall is logged as what the autoscaler must add.
    """
    if nodes is None:
        nodes = ray.nodes()
    alive = [node for node in nodes if node.get("Alive")]
    problem, hint = None, ""
    for demand in demands:
        problem = _placement_problem(demand.unit, demand.count, demand.what, alive)
        if problem is not None:
            hint = demand.hint
            break
    if problem is None:
        problem, hint = _together_problem(demands, alive)
    if problem is None:
        return
    message = (f"{phase}: " if phase else "") + f"{problem}; nodes: {_format_nodes(alive)}" + (
        f". To fix: {hint}" if hint else "")
    if allow_autoscale:
        log.warning("%s. Waiting for the autoscaler to add nodes: this waits forever if no node type of the "
                    "cluster config offers it.", message)
        return
    raise PlacementError(message)


def total_need(demands: list[Demand]) -> dict:
    """Per resource, what ``demands`` hold together."""
    need: dict = {}
    for demand in demands:
        for name, amount in demand.unit.items():
            need[name] = need.get(name, 0.0) + amount * demand.count
    return need


def units_per_node(unit: dict, node_resources: dict) -> float:
    """How many units of ``unit`` fit in a node with these total resources (inf for an empty unit)."""
    if not unit:
        return math.inf
    return min(math.floor(node_resources.get(k, 0.0) / v + _EPS) for k, v in unit.items())


def _placement_problem(unit: dict, count: int, what: str, alive: list[dict]) -> Optional[str]:
    """The reason ``count`` units cannot be placed on the ``alive`` nodes, or None when they can."""
    need = f"{what} need {_format(unit)} each"
    missing = sorted(k for k in unit if not any(node["Resources"].get(k, 0.0) > 0 for node in alive))
    if missing:
        return f"{need}, but no alive node offers {', '.join(missing)}"
    capacity = sum(units_per_node(unit, node["Resources"]) for node in alive)
    if capacity == 0:
        return f"{need}, but no alive node has all of that at once"
    if capacity < count:
        return f"{count} {need}, but the alive nodes can host only {capacity}"
    return None


def _together_problem(demands: list[Demand], alive: list[dict]) -> tuple[Optional[str], str]:
    """(why the demands cannot run at once on the ``alive`` nodes, what to change), or (None, "") when they can."""
    need = total_need(demands)
    have = {name: sum(node["Resources"].get(name, 0.0) for node in alive) for name in need}
    short = [name for name in need if need[name] > have[name] + _EPS]
    if not short:
        return None, ""
    involved = [d for d in demands if any(name in d.unit for name in short)]
    each = " + ".join(f"{d.count} {d.what}{'s' * (d.count > 1 and not d.what.endswith('s'))} "
                      f"({_format(d.unit)} each)" for d in involved)
    levers = [d.lever for d in involved if d.lever]
    problem = (f"{each} run at once and need {_format({n: need[n] for n in short})} together, but the alive nodes "
               f"have {_format({n: have[n] for n in short})} in all")
    hint = (f"lower {' or '.join(levers)}, or " if levers else "") + f"add nodes offering {', '.join(short)}"
    return problem, hint


def _unit(num_cpus: float, num_gpus: float, resources: dict) -> dict:
    return {k: float(v) for k, v in {"CPU": num_cpus, "GPU": num_gpus, **resources}.items() if v}


def _format(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in resources.items()) + "}"


def _format_nodes(alive: list[dict]) -> str:
    """One entry per alive node: address, short id, head marker and the resources that matter."""
    if not alive:
        return "none alive"
    entries = []
    for node in alive:
        res = node["Resources"]
        head = ", head" if "node:__internal_head__" in res else ""
        shown = {k: v for k, v in sorted(res.items()) if not k.startswith("node:") and k not in _IMPLICIT_RESOURCES}
        entries.append(f"{node.get('NodeManagerAddress', '?')} ({node.get('NodeID', '?')[:8]}{head}) {_format(shown)}")
    return "; ".join(entries)
