"""Shadow and canary against a real worker and Redis, driven by the CLI as an operator would:
a broken canary (labels permuted) rolled back by agreement and by live accuracy, a good one
promoted after N jobs, shadow answers never returned, jobs naming a version never rerouted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.client import Client
from producer.registry import Registry
from producer.rollout import history
from tests.factories import batchery_cli, digit_paths, label_of, worker_on_own_registry

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "models" / "mnist-cnn" / "2" / "model.keras"
DIGITS = [p.read_bytes() for p in digit_paths()]
TRUTH = [label_of(p) for p in digit_paths()]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Client, dict[str, str]]]:
    with worker_on_own_registry(tmp_path_factory.mktemp("rollouts")) as (client, env):
        # Version 4: the served weights with their labels permuted (a broken retrain);
        # version 5: the served weights as they are (a good one).
        for labels in ("1,2,3,4,5,6,7,8,9,0", "0,1,2,3,4,5,6,7,8,9"):
            done = batchery(env, "models", "publish", str(WEIGHTS), "--name", "mnist-cnn",
                            "--labels", labels)  # fmt: skip
            assert done.returncode == 0, done.stderr
        yield client, env


batchery = batchery_cli


def watcher(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "batchery.cli", "models", "canary", *args, "--watch",
               "--every", "0.2"]  # fmt: skip
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def answers(client: Client, rounds: int = 1, **kw: str) -> list[dict]:  # type: ignore[type-arg]
    ids = client.submit_many(DIGITS * rounds, **kw)
    results = client.results(ids, timeout=120)
    assert all(r["status"] == "SUCCESS" for r in results), results[:3]
    return results


def served_by(results: list[dict]) -> dict[str, int]:  # type: ignore[type-arg]
    found: dict[str, int] = {}
    for r in results:
        found[r["version"]] = found.get(r["version"], 0) + 1
    return found


def settle(client: Client, version: str, timeout: float = 30) -> None:
    """Until a round of jobs naming no version is all answered by ``version``: the worker has
    read the registry's change (it looks every 0.2 s). A round, not one job: before a
    promotion is read, a canary of the same version answers about half of them."""
    deadline = time.monotonic() + timeout
    while (served := served_by(answers(client))) != {version: len(DIGITS)}:
        assert time.monotonic() < deadline, f"still served by {served}, not {version}"
        time.sleep(0.05)


def jobs_of(env: dict[str, str], version: str) -> int:
    """Jobs ``version`` of mnist-cnn ran in the monitoring window (``batchery monitor``)."""
    rows = json.loads(batchery(env, "monitor", "mnist-cnn", "--json").stdout)
    return sum(int(row["jobs"]) for row in rows if row["version"] == version)


def shadowing(client: Client, env: dict[str, str], version: str, timeout: float = 30) -> int:
    """Until ``version`` runs jobs as a shadow (sent a job at a time); its count then."""
    deadline = time.monotonic() + timeout
    before = jobs_of(env, version)
    while True:
        client.result(client.submit(DIGITS[0]), timeout=60)
        if (now := jobs_of(env, version)) > before:
            return now
        assert time.monotonic() < deadline, f"{version} never ran a job as a shadow"


def run_until_done(client: Client, proc: subprocess.Popen[str], feedback: bool = False,
                   limit_s: float = 120) -> tuple[int, list[dict]]:  # type: ignore[type-arg]  # fmt: skip
    """Send the digits round after round (with their true labels as feedback, if asked)
    until the guardrail process exits; its status and every answer seen."""
    seen: list[dict] = []  # type: ignore[type-arg]
    deadline = time.monotonic() + limit_s
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the guardrails never decided"
        results = answers(client)
        seen += results
        if feedback:
            for r, truth in zip(results, TRUTH, strict=True):
                if r["version"] != "2":
                    client.feedback(r["job_id"], truth)
    return proc.wait(30), seen


def test_a_shadow_runs_on_its_share_and_its_answers_are_never_returned(
    stack: tuple[Client, dict[str, str]],
) -> None:
    client, env = stack
    done = batchery(env, "models", "shadow", "mnist-cnn", "4", "--percent", "50")
    assert done.returncode == 0, done.stderr
    probed = shadowing(client, env, "4")
    results = answers(client, rounds=3)
    assert served_by(results) == {"2": 300}  # every answer from the served version
    assert sum(r["label"] == t for r, t in zip(results, TRUTH * 3, strict=True)) >= 290
    rows = {row["version"]: row for row in json.loads(
        batchery(env, "monitor", "mnist-cnn", "--json").stdout)}  # fmt: skip
    assert 100 < rows["4"]["jobs"] - probed < 200  # about half of 300 ran on the shadow too
    assert rows["4"]["agreement"]["rate"] < 0.2  # permuted labels: it disagrees
    assert batchery(env, "models", "shadow", "mnist-cnn", "--off").returncode == 0


def test_a_broken_canary_is_rolled_back_by_agreement_and_named_jobs_are_never_rerouted(
    stack: tuple[Client, dict[str, str]],
) -> None:
    client, env = stack
    proc = watcher(env, "mnist-cnn", "4", "--percent", "30", "--promote-after", "100000")
    status, seen = run_until_done(client, proc)
    out = proc.stdout.read() if proc.stdout else ""
    assert status == 1, out
    assert "rolled back mnist-cnn@4: agreement with mnist-cnn@2" in out
    assert served_by(seen).get("4", 0) > 0  # it did answer its share meanwhile
    last = history(client.redis, "mnist-cnn")[0]
    assert last["action"] == "rollback" and last["figures"]["agreement"] < 0.9
    # Rolled back: every job goes to the served version again; a job naming a version gets
    # exactly that version, canary or not.
    assert served_by(answers(client, rounds=2)) == {"2": 200}
    assert served_by(answers(client, version="1")) == {"1": 100}
    assert Registry(Path(env["BATCHERY_MODEL_DIR"])).promoted("mnist-cnn") == "2"
    text = batchery(env, "models", "history", "mnist-cnn").stdout
    assert "rollback" in text and "mnist-cnn@4" in text
    status = batchery(env, "status").stdout
    assert "1 rolled back" in status, status


def test_a_named_version_is_not_rerouted_while_a_canary_answers(
    stack: tuple[Client, dict[str, str]],
) -> None:
    client, env = stack
    done = batchery(env, "models", "canary", "mnist-cnn", "4", "--percent", "100",
                    "--promote-after", "100000")  # fmt: skip
    assert done.returncode == 0, done.stderr
    settle(client, "4")
    try:
        assert served_by(answers(client)) == {"4": 100}  # the canary takes every unnamed job
        assert served_by(answers(client, version="2")) == {"2": 100}
        assert served_by(answers(client, version="1")) == {"1": 100}
    finally:
        assert batchery(env, "models", "canary", "mnist-cnn", "--off").returncode == 0
    settle(client, "2")
    assert served_by(answers(client)) == {"2": 100}


def test_a_broken_canary_is_rolled_back_by_live_accuracy_from_feedback(
    stack: tuple[Client, dict[str, str]],
) -> None:
    client, env = stack
    proc = watcher(env, "mnist-cnn", "4", "--percent", "30", "--promote-after", "100000",
                   "--min-agreement", "0", "--min-accuracy", "0.8")  # fmt: skip
    status, _ = run_until_done(client, proc, feedback=True)
    out = proc.stdout.read() if proc.stdout else ""
    assert status == 1 and "rolled back mnist-cnn@4: live accuracy" in out, out
    assert history(client.redis, "mnist-cnn")[0]["figures"]["accuracy"] < 0.8


def test_a_good_canary_is_promoted_after_n_jobs(stack: tuple[Client, dict[str, str]]) -> None:
    client, env = stack
    proc = watcher(env, "mnist-cnn", "5", "--percent", "50", "--promote-after", "150")
    status, _ = run_until_done(client, proc)
    out = proc.stdout.read() if proc.stdout else ""
    assert status == 0 and "promoted mnist-cnn@5" in out, out
    assert Registry(Path(env["BATCHERY_MODEL_DIR"])).promoted("mnist-cnn") == "5"
    settle(client, "5")
    assert served_by(answers(client)) == {"5": 100}
    assert history(client.redis, "mnist-cnn")[0]["action"] == "promote"
