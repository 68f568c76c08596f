"""Rollouts as registry state: signed like PROMOTED, picked by job id, judged from counts."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import fakeredis
import pytest

from producer.errors import ConfigError, ModelLoadError, ModelNotFoundError
from producer.monitoring import add_counts
from producer.registry import ROLLOUT_FILE, Registry
from producer.rollout import MIN_COMPARED, Rollout, judge, picked
from producer.settings import Settings
from producer.wire import feedback_counts_key
from tests.unit.test_signing_and_tls_settings import DIGITS, SHIPPED, signed_registry, signing

__all__ = ["signing"]  # the fixture, imported for these tests


def test_a_share_is_picked_by_job_id_the_same_every_time_and_about_its_size() -> None:
    ids = [f"job-{i}" for i in range(20000)]
    share = [picked(i, 10, "canary") for i in ids]
    assert share == [picked(i, 10, "canary") for i in ids]  # a redelivery meets the same version
    assert 0.09 < sum(share) / len(ids) < 0.11
    assert not any(picked(i, 0, "canary") for i in ids) and all(picked(i, 100, "x") for i in ids)
    # Shadow and canary shares are drawn apart: not the same jobs.
    both = sum(a and picked(i, 10, "shadow") for i, a in zip(ids, share, strict=True))
    assert both < 0.02 * len(ids)


def test_a_rollout_on_a_signed_registry_needs_the_key_and_must_verify(
    signing: Settings, tmp_path: Path
) -> None:
    registry = signed_registry(signing, tmp_path / "models")
    for _ in range(2):
        registry.publish(SHIPPED, "m", DIGITS, (28, 28, 1))
    rollout = Rollout("m", canary="2", canary_percent=10).to_json()
    registry.set_rollout("m", rollout)
    assert registry.rollout("m") == rollout
    keyless = Registry(registry.root, verifier=registry.verifier)  # a worker's, a gateway's
    with pytest.raises(ConfigError, match="needs BATCHERY_SIGNING_KEY"):
        keyless.set_rollout("m", None)
    with pytest.raises(ModelNotFoundError):
        registry.set_rollout("m", {**rollout, "canary": "9"})  # no such version
    # Written by hand, unsigned (or tampered with): refused when read.
    (registry.root / "m" / ROLLOUT_FILE).write_text('{"canary": "2", "canary_percent": 100}\n')
    with pytest.raises(ModelLoadError):
        keyless.rollout("m")


def counts(**fields: int) -> Counter[str]:
    return Counter(fields)


@pytest.mark.parametrize(
    ("written", "feedback", "action", "reason"),
    [
        (counts(n=100, compared=100, agree=95), {}, "continue", "100 of 1000"),
        (counts(n=100, compared=100, agree=40), {}, "rollback", "agreement"),
        (counts(n=60, err=40, compared=60, agree=60), {}, "rollback", "error rate"),
        (counts(n=1000, compared=1000, agree=990), {}, "promote", "every guardrail"),
        (counts(n=100, compared=100, agree=100), {"3\t3": 10, "3\t5": 30}, "rollback",
         "live accuracy"),
    ],
)  # fmt: skip
def test_the_guardrails_judge_the_canary_from_what_workers_wrote(
    written: Counter[str], feedback: dict[str, int], action: str, reason: str
) -> None:
    r = fakeredis.FakeRedis()
    accuracy = 0.8 if feedback else None
    rollout = Rollout("m", canary="2", canary_percent=10, min_accuracy=accuracy, started=0)
    with r.pipeline() as pipe:
        add_counts(pipe, "m", "2", written)
        pipe.execute()
    if feedback:
        r.hset(feedback_counts_key("m", "2"), mapping=feedback)
    decision = judge(r, replace(rollout, started=time.time()), "1", {}, 0.2, 1000)
    assert decision.action == action and reason in decision.reason, decision


def test_agreement_is_not_judged_on_too_few_comparisons() -> None:
    r = fakeredis.FakeRedis()
    few = MIN_COMPARED - 1
    with r.pipeline() as pipe:
        add_counts(pipe, "m", "2", counts(n=few, compared=few, agree=0))
        pipe.execute()
    decision = judge(r, Rollout("m", canary="2", started=time.time()), "1", {}, 0.2, 1000)
    assert decision.action == "continue"
