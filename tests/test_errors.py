"""The error family: one base, the old base classes and import locations kept, the same vocabulary mismatch
raising the same class wherever it is found, and the original error found again behind Ray's wrappers."""

from __future__ import annotations

import pickle

import pytest

from tailkd_ray.errors import (CacheError, ConfigError, DataError, NonFiniteLogitsError, PlacementError, TailKDError,
                               VocabularyError, find_tailkd_error)


def test_every_kind_is_a_tailkd_error_and_keeps_its_old_base():
    for kind in (ConfigError, DataError, CacheError, VocabularyError, NonFiniteLogitsError):
        assert issubclass(kind, TailKDError) and issubclass(kind, ValueError), kind
    assert issubclass(PlacementError, TailKDError) and issubclass(PlacementError, RuntimeError)


def test_old_import_locations_give_the_same_classes():
    from tailkd_ray.config import ConfigError as config_error
    from tailkd_ray.data import DataError as data_error
    from tailkd_ray.placement import PlacementError as placement_error
    from tailkd_ray.core.summary import NonFiniteLogitsError as non_finite_error

    assert (config_error, data_error, placement_error, non_finite_error) == (
        ConfigError, DataError, PlacementError, NonFiniteLogitsError)


def test_non_finite_logits_error_survives_pickling():
    """Ray pickles exceptions from workers; the structured constructor must be rebuilt with its arguments."""
    error = pickle.loads(pickle.dumps(NonFiniteLogitsError((1, 2), 7, context="teacher t")))
    assert (error.position, error.token, error.context) == ((1, 2), 7, "teacher t")
    assert str(error).startswith("teacher t: teacher logits are not finite at position (1, 2) (vocabulary entry 7)")


def test_find_tailkd_error_behind_chains_and_ray_wrappers():
    from ray.exceptions import RayTaskError, UserCodeException
    from ray.train import WorkerGroupError

    original = VocabularyError("token tables differ")
    assert find_tailkd_error(original) is original
    assert find_tailkd_error(RuntimeError("plain")) is None
    try:
        try:
            raise original
        except VocabularyError as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        assert find_tailkd_error(outer) is original

    task_error = RayTaskError("score", "Traceback ...", original)
    assert find_tailkd_error(task_error) is original
    # as_instanceof_cause() is itself a VocabularyError, but prints Ray's traceback: the cause is returned.
    assert find_tailkd_error(task_error.as_instanceof_cause()) is original
    assert find_tailkd_error(WorkerGroupError("rank 1 failed", {0: RuntimeError("x"), 1: task_error})) is original

    # Ray Data: UserCodeException raised *from* the original, a link lost on the way to the driver; the
    # remote traceback's text still names it.
    text = ("Traceback (most recent call last):\n  File \"teacher.py\", line 1\n"
            "tailkd_ray.errors.NonFiniteLogitsError: summarize: not finite\n\nThe above exception was the direct "
            "cause of the following exception:\n\ntailkd_ray.errors.NonFiniteLogitsError: teacher t: block 3: not "
            "finite\n\nray.exceptions.UserCodeException: UDF failed to process a data block.")
    rebuilt = find_tailkd_error(RayTaskError("map", text, UserCodeException("UDF failed")).as_instanceof_cause())
    assert type(rebuilt) is NonFiniteLogitsError and str(rebuilt) == "teacher t: block 3: not finite"
    assert find_tailkd_error(RayTaskError("map", "ValueError: other", UserCodeException("x"))) is None


@pytest.mark.ray
def test_error_raised_in_a_ray_data_udf_is_found_on_the_driver(ray_session):
    import ray.data

    def fails(batch):
        raise CacheError("summary cache /c is incomplete: run `tailkd score` again")

    with pytest.raises(Exception) as raised:
        ray.data.range(2).map_batches(fails).take_all()
    found = find_tailkd_error(raised.value)
    assert type(found) is CacheError and str(found) == "summary cache /c is incomplete: run `tailkd score` again"


def test_every_vocabulary_mismatch_raises_vocabulary_error(tiny_llama_dir):
    """models.check_vocab_compatible (driver, at start-up), models.build_student (a built student) and the teacher
    pool's id check (teacher.pool.TeacherScorer, inside an actor) raise one class for one problem."""
    import numpy as np

    from tailkd_ray.config import load_config
    from tailkd_ray.models import build_student, check_vocab_compatible
    from tailkd_ray.teacher.pool import TeacherScorer, scorer_kwargs

    with pytest.raises(VocabularyError, match="student .* has vocab_size 256 but the tokenizer .* has 320 tokens"):
        check_vocab_compatible(str(tiny_llama_dir), {"vocab_size": 256}, None)

    cfg = load_config(None, [f"teacher.model={tiny_llama_dir}", "data.seq_len=8"])
    narrower = load_config(None, [f"teacher.model={tiny_llama_dir}", "student.config={vocab_size: 256}"])
    with pytest.raises(VocabularyError, match="the built student has vocab_size 256 but the tokenizer .* has 320"):
        build_student(narrower)

    scorer = TeacherScorer(**scorer_kwargs(cfg))
    with pytest.raises(VocabularyError, match=r"token id 320 at position 2 is outside the teacher's vocabulary"):
        scorer({"input_ids": np.array([[1, 2, 320, 4, 5, 6, 7, 8, 9]])})
