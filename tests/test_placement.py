"""Placement: the resources teacher actors and trainer workers ask for, and the fail-fast cluster check.

The first tests are pure (node lists written out). The last ones start a 3-node ``ray.cluster_utils.Cluster``
(a head with no CPUs, one inference node, one training node) and check ``require_placement`` against the
live ``ray.nodes()`` and that Ray really puts the requests on the right nodes.

A driver can be connected to one Ray instance only, so the Cluster cannot share the session's
``ray_session``: if another test module already started it, the fixture stops it first and restarts it
(``conftest.start_shared_ray``) when this module is done.
"""

from __future__ import annotations

import logging

import pytest

from tailkd_ray.config import TeacherConfig, TrainConfig
from tailkd_ray.placement import (
    PlacementError, require_placement, require_teacher_placement, require_train_placement, teacher_ray_options,
    train_worker_resources, units_per_node,
)


def node(node_id: str, head: bool = False, alive: bool = True, **resources) -> dict:
    """A ``ray.nodes()`` entry with the given total resources."""
    res = {"memory": 1e9, "object_store_memory": 1e8, f"node:{node_id}": 1.0, **resources}
    if head:
        res["node:__internal_head__"] = 1.0
    return {"NodeID": node_id, "NodeManagerAddress": "10.0.0.1", "Alive": alive, "Resources": res}


GPU_CLUSTER = [
    node("head0000", head=True),
    node("infer000", CPU=48.0, GPU=4.0, tailkd_inference=4.0),
    node("train000", CPU=96.0, GPU=8.0, tailkd_training=8.0),
]


def test_teacher_ray_options_carry_gpus_and_custom_resources():
    assert teacher_ray_options(TeacherConfig(num_gpus=1, resources={"tailkd_inference": 1})) == {
        "num_gpus": 1, "resources": {"tailkd_inference": 1}}
    assert teacher_ray_options(TeacherConfig()) == {}  # CPU actor: Ray Data's defaults


def test_train_worker_resources_add_cpu_or_gpu_to_custom_resources():
    assert train_worker_resources(TrainConfig(use_gpu=True, resources_per_worker={"tailkd_training": 1})) == {
        "GPU": 1.0, "tailkd_training": 1}
    assert train_worker_resources(TrainConfig(use_gpu=False)) == {"CPU": 1.0}
    assert train_worker_resources(TrainConfig(use_gpu=False, resources_per_worker={"CPU": 4, "x": 1})) == {
        "CPU": 4, "x": 1}


def test_units_per_node_is_the_tightest_resource():
    assert units_per_node({"CPU": 1.0, "GPU": 1.0, "tailkd_inference": 1.0},
                          {"CPU": 48.0, "GPU": 4.0, "tailkd_inference": 4.0}) == 4
    assert units_per_node({"GPU": 0.5}, {"GPU": 4.0}) == 8
    assert units_per_node({"GPU": 0.1}, {"GPU": 1.0}) == 10  # float rounding does not lose a unit
    assert units_per_node({"CPU": 3.0}, {"CPU": 8.0}) == 2
    assert units_per_node({"tailkd_training": 1.0}, {"CPU": 8.0}) == 0


def test_gpu_cluster_hosts_teachers_and_trainers_but_not_on_the_head():
    teacher = TeacherConfig(num_gpus=1, min_actors=4, resources={"tailkd_inference": 1})
    train = TrainConfig(use_gpu=True, num_workers=8, resources_per_worker={"tailkd_training": 1})
    require_teacher_placement(teacher, allow_autoscale=False, nodes=GPU_CLUSTER)
    require_train_placement(train, allow_autoscale=False, nodes=GPU_CLUSTER)
    with pytest.raises(PlacementError, match="no alive node offers CPU, GPU, tailkd_inference"):
        require_teacher_placement(teacher, allow_autoscale=False, nodes=GPU_CLUSTER[:1])


def test_missing_resource_names_it_the_nodes_and_the_fix():
    teacher = TeacherConfig(num_gpus=1, resources={"tailkd_inference": 1})
    nodes = [GPU_CLUSTER[0], GPU_CLUSTER[2]]
    with pytest.raises(PlacementError) as error:
        require_teacher_placement(teacher, allow_autoscale=False, nodes=nodes)
    message = str(error.value)
    assert message.startswith("teacher actors need {CPU: 1, GPU: 1, tailkd_inference: 1} each, "
                              "but no alive node offers tailkd_inference; nodes: ")
    assert "10.0.0.1 (head0000, head) {}" in message
    assert "(train000) {CPU: 96, GPU: 8, tailkd_training: 8}" in message
    assert "add an inference node" in message and "teacher.resources (now {tailkd_inference: 1})" in message


def test_no_single_node_with_everything_at_once():
    with pytest.raises(PlacementError, match="no alive node has all of that at once"):
        require_placement(resources={"tailkd_inference": 1, "tailkd_training": 1}, num_gpus=0, num_cpus=0,
                          count=1, what="workers", nodes=GPU_CLUSTER)


def test_too_few_units_for_the_count():
    train = TrainConfig(use_gpu=True, num_workers=9, resources_per_worker={"tailkd_training": 1})
    with pytest.raises(PlacementError, match=r"9 trainer workers need \{GPU: 1, tailkd_training: 1\} each, "
                                             r"but the alive nodes can host only 8.*lower train.num_workers"):
        require_train_placement(train, allow_autoscale=False, nodes=GPU_CLUSTER)


def test_dead_nodes_do_not_count():
    nodes = [GPU_CLUSTER[0], {**GPU_CLUSTER[1], "Alive": False}]
    with pytest.raises(PlacementError, match="no alive node offers"):
        require_placement(resources={"tailkd_inference": 1}, num_gpus=0, num_cpus=0, count=1, what="x",
                          nodes=nodes)


def test_autoscaling_cluster_logs_what_it_waits_for_instead_of_raising(caplog):
    teacher = TeacherConfig(num_gpus=1, resources={"tailkd_inference": 1})
    with caplog.at_level(logging.WARNING, logger="tailkd_ray.placement"):
        require_teacher_placement(teacher, allow_autoscale=True, nodes=GPU_CLUSTER[:1])
    assert "no alive node offers CPU, GPU, tailkd_inference" in caplog.text
    assert "Waiting for the autoscaler" in caplog.text


# ---- a live 3-node cluster ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def three_node_cluster():
    """Head with 0 CPUs, an inference node {CPU: 2, tailkd_inference: 1}, a training node {CPU: 2,
    tailkd_training: 2}; yields (inference node id, training node id) with the driver connected."""
    import ray
    from ray.cluster_utils import Cluster

    shared_was_running = ray.is_initialized()
    if shared_was_running:  # another module's ray_session: one driver, one Ray instance
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        inference = cluster.add_node(num_cpus=2, resources={"tailkd_inference": 1})
        training = cluster.add_node(num_cpus=2, resources={"tailkd_training": 2})
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        yield inference.node_id, training.node_id
    finally:
        ray.shutdown()
        cluster.shutdown()
        if shared_was_running:
            from conftest import start_shared_ray

            start_shared_ray()


@pytest.mark.ray
def test_live_cluster_hosts_one_teacher_and_two_trainers(three_node_cluster):
    require_teacher_placement(TeacherConfig(resources={"tailkd_inference": 1}), allow_autoscale=False)
    require_train_placement(TrainConfig(num_workers=2, resources_per_worker={"tailkd_training": 1}),
                            allow_autoscale=False)


@pytest.mark.ray
@pytest.mark.parametrize("config, match", [
    (TeacherConfig(min_actors=2, max_actors=2, resources={"tailkd_inference": 1}),
     r"2 teacher actors need \{CPU: 1, tailkd_inference: 1\} each, but the alive nodes can host only 1"),
    (TeacherConfig(num_gpus=1, resources={"tailkd_inference": 1}), r"no alive node offers GPU;"),
    (TrainConfig(num_workers=3, resources_per_worker={"tailkd_training": 1}),
     r"3 trainer workers need \{CPU: 1, tailkd_training: 1\} each, but the alive nodes can host only 2"),
    (TrainConfig(num_workers=1, resources_per_worker={"tailkd_training": 1, "tailkd_inference": 1}),
     r"no alive node has all of that at once"),
])
def test_live_cluster_rejects_what_no_node_can_host(three_node_cluster, config, match):
    check = require_teacher_placement if isinstance(config, TeacherConfig) else require_train_placement
    with pytest.raises(PlacementError, match=match) as error:
        check(config, allow_autoscale=False)
    assert ", head) {}" in str(error.value)  # the nodes are listed, the head with no resources


@pytest.mark.ray
def test_ray_places_teacher_actor_and_trainer_bundles_on_their_nodes(three_node_cluster):
    """The options the helpers build are valid Ray options and land where the check says they fit."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    inference_id, training_id = three_node_cluster

    @ray.remote
    class Probe:
        def node_id(self) -> str:
            return ray.get_runtime_context().get_node_id()

    teacher = TeacherConfig(resources={"tailkd_inference": 1})
    actor = Probe.options(num_cpus=1, **teacher_ray_options(teacher)).remote()
    assert ray.get(actor.node_id.remote(), timeout=60) == inference_id
    ray.kill(actor)

    bundle = train_worker_resources(TrainConfig(resources_per_worker={"tailkd_training": 1}))
    group = placement_group([bundle, bundle], strategy="PACK")  # what Ray Train reserves for 2 workers
    ray.get(group.ready(), timeout=60)
    assert set(placement_group_table(group)["bundles_to_node_id"].values()) == {training_id}
    remove_placement_group(group)
