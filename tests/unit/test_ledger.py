"""The ledger sends again a message lost between BRPOP and kombu's unacked record."""

from __future__ import annotations

import json

import fakeredis

from producer import ledger
from producer.ledger import Ledger
from producer.wire import (
    UNACKED_KEY,
    Job,
    backlog_key,
    build_message,
    ledger_due_key,
    ledger_jobs_key,
    ledger_key,
)


def messages(n: int, queue: str = "q") -> list:
    return [build_message([Job(f"job-{i}", b"img")], queue) for i in range(n)]


def test_push_records_every_message_and_settle_strikes_them_off() -> None:
    r = fakeredis.FakeRedis()
    sent = messages(3)
    assert Ledger(r, "q").push(sent, check_after_s=60) == 3
    assert r.llen("q") == 3 and r.hlen(ledger_key("q")) == 3 and r.zcard(ledger_due_key("q")) == 3
    with r.pipeline() as pipe:
        ledger.settle(pipe, "q", [sent[0].id, sent[1].id])
        pipe.execute()
    assert r.hkeys(ledger_key("q")) == [sent[2].id.encode()]


def test_a_full_queue_takes_nothing() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    book.push(messages(2), 60, limit=3)
    assert book.push(messages(2), 60, limit=3) == -1
    assert r.llen("q") == 2 and r.hlen(ledger_key("q")) == 2


def test_sweep_resends_only_what_is_neither_queued_nor_held() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    queued, held, lost = messages(3)
    book.push([queued, held, lost], check_after_s=-1)  # all overdue at once
    # A worker took `held` (kombu recorded it unacked) and `lost` (the record never made it).
    r.lrem("q", 0, held.raw)
    r.lrem("q", 0, lost.raw)
    r.hset(UNACKED_KEY, held.tag, "...")
    assert book.sweep(check_after_s=60, expire_s=3600, every_s=0.001) == 1
    assert r.lrange("q", 0, -1).count(lost.raw.encode()) == 1
    assert r.llen("q") == 2  # `queued` is still there once; `held` was left to kombu
    r.delete("batchery:ledger:q:sweeping")
    # Checked again only after another check_after_s: no resend storm.
    assert book.sweep(check_after_s=60, expire_s=3600, every_s=0.001) == 0


def test_a_settled_or_refused_message_is_never_resent() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    settled, refused = messages(2)
    book.push([settled, refused], check_after_s=-1)
    r.delete("q")
    with r.pipeline() as pipe:
        ledger.settle(pipe, "q", [settled.id])
        pipe.execute()
    book.strike([refused.id])
    assert book.sweep(60, 3600) == 0 and r.llen("q") == 0
    assert r.hlen(ledger_key("q")) == 0 and r.zcard(ledger_due_key("q")) == 0


def test_each_queue_sweeps_only_its_own_messages() -> None:
    r = fakeredis.FakeRedis()
    [mine] = messages(1, "mine")
    [theirs] = messages(1, "theirs")
    Ledger(r, "mine").push([mine], check_after_s=-1)
    Ledger(r, "theirs").push([theirs], check_after_s=-1)
    r.delete("mine", "theirs")  # both lost in transit
    assert Ledger(r, "mine").sweep(60, 3600) == 1
    assert r.lrange("mine", 0, -1) == [mine.raw.encode()]
    assert r.llen("theirs") == 0  # never pushed onto another queue


def test_old_entries_expire_instead_of_coming_back() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    book.push(messages(2), check_after_s=-1)
    r.delete("q")
    assert book.sweep(60, expire_s=-1) == 0  # older than the expiry: dropped, not resent
    assert r.llen("q") == 0 and r.hlen(ledger_key("q")) == 0 and r.zcard(ledger_due_key("q")) == 0


def test_one_process_sweeps_at_a_time() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    book.push(messages(1), check_after_s=-1)
    r.delete("q")
    assert Ledger(r, "q").sweep(60, 3600, every_s=30) == 1
    book.push(messages(1), check_after_s=-1)
    r.delete("q")
    assert book.sweep(60, 3600, every_s=30) == 0  # the other process holds the sweep


def test_a_deep_queue_is_never_scanned_whole(monkeypatch) -> None:
    r = fakeredis.FakeRedis()
    monkeypatch.setattr(ledger, "SCAN", 10)
    book = Ledger(r, "q")
    [lost] = messages(1)
    book.push([lost], check_after_s=-1)
    r.delete("q")
    # Twenty messages queued after it: the lost one can't be told from one still waiting
    # among them without scanning past the ten oldest, so it waits for a shorter queue.
    book.push(messages(20), check_after_s=3600)
    assert Ledger(r, "q").sweep(60, 3600, every_s=0.001) == 0
    for _ in range(11):
        r.rpop("q")
    r.zadd(ledger_due_key("q"), {lost.id: 0})
    r.delete("batchery:ledger:q:sweeping")
    assert Ledger(r, "q").sweep(60, 3600, every_s=0.001) == 1


def carrying(*counts: int, queue: str = "q") -> list:
    """One message per count, each carrying that many jobs."""
    return [build_message([Job(f"m{m}-{i}", b"img") for i in range(n)], queue)
            for m, n in enumerate(counts)]  # fmt: skip


def test_the_backlog_counts_jobs_not_messages_until_they_are_answered() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    big, one, mid = carrying(256, 1, 40)
    book.push([big, one, mid], check_after_s=60)
    assert ledger.backlog(r, "q") == 297
    # A push sent again (its reply lost with a connection) adds nothing.
    book.push([one], check_after_s=60)
    assert ledger.backlog(r, "q") == 297
    # Taken by a worker (buffered, running): still backlog until the answers are stored.
    r.delete("q")
    assert ledger.backlog(r, "q") == 297
    with r.pipeline() as pipe:
        ledger.settle(pipe, "q", [big.id, "not-a-message"])
        pipe.execute()
    assert ledger.backlog(r, "q") == 41
    book.strike([mid.id, mid.id])  # a refused message, struck twice, counts once
    assert ledger.backlog(r, "q") == 1


def test_entries_the_sweep_drops_leave_the_backlog_and_it_never_goes_negative() -> None:
    r = fakeredis.FakeRedis()
    book = Ledger(r, "q")
    sent = carrying(3, 2)
    book.push(sent, check_after_s=-1)
    r.set(backlog_key("q"), 1)  # counted by an older version, say
    r.delete("q")
    assert book.sweep(check_after_s=60, expire_s=-10, every_s=0.001) == 0  # all too old
    assert ledger.backlog(r, "q") == 0 and int(r.get(backlog_key("q"))) == 0
    assert r.hlen(ledger_key("q")) == 0 and r.hlen(ledger_jobs_key("q")) == 0


def test_a_lite_job_travels_in_its_lane_and_is_sent_again_there() -> None:
    from producer.wire import chunk_jobs, lane_queue, queue_key, queue_keys

    r = fakeredis.FakeRedis()
    jobs = [Job("k1", b"img"), Job("l1", b"img", lane="lite"), Job("l2", b"img", lane="lite"),
            Job("h1", b"img", priority="high", lane="lite")]  # fmt: skip
    chunks = chunk_jobs(jobs, 256, 1 << 20)
    assert [[j.id for j in c] for c in chunks] == [["k1"], ["l1", "l2"], ["h1"]]
    sent = [build_message(c, "q") for c in chunks]
    assert [json.loads(m.raw)["properties"]["delivery_info"]["routing_key"] for m in sent] == [
        "q",
        "q.lite",
        "q.lite",
    ]
    book = Ledger(r, "q")
    assert book.push(sent, check_after_s=-1) == 3
    assert (
        r.llen("q") == 1 and r.llen("q.lite") == 1 and r.llen(queue_key("q", "high", "lite")) == 1
    )
    assert queue_keys("q") == [queue_key("q", p, lane) for lane in ("", "lite")
                               for p in ("high", "normal", "low")]  # fmt: skip
    assert lane_queue("q", "lite") == "q.lite" and lane_queue("q") == "q"
    # Lost between the list and the worker: sent again into its own lane, not the main one.
    r.delete("q.lite")
    assert book.sweep(check_after_s=60, expire_s=3600, every_s=0.001) == 1
    assert r.lrange("q.lite", 0, -1) == [sent[1].raw.encode()] and r.llen("q") == 1
    assert int(r.get(backlog_key("q"))) == 4  # one backlog for both lanes
