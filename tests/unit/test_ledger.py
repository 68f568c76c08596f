"""The ledger sends again a message lost between BRPOP and kombu's unacked record."""

from __future__ import annotations

import fakeredis

from producer import ledger
from producer.wire import LEDGER_DUE_KEY, LEDGER_KEY, UNACKED_KEY, Job, build_message


def messages(n: int) -> list:
    return [build_message([Job(f"job-{i}", b"img")], "q") for i in range(n)]


def test_push_records_every_message_and_settle_strikes_them_off() -> None:
    r = fakeredis.FakeRedis()
    sent = messages(3)
    assert ledger.push(r, "q", sent, check_after_s=60) == 3
    assert r.llen("q") == 3 and r.hlen(LEDGER_KEY) == 3 and r.zcard(LEDGER_DUE_KEY) == 3
    with r.pipeline() as pipe:
        ledger.settle(pipe, [sent[0].id, sent[1].id])
        pipe.execute()
    assert r.hkeys(LEDGER_KEY) == [sent[2].id.encode()]


def test_a_full_queue_takes_nothing() -> None:
    r = fakeredis.FakeRedis()
    ledger.push(r, "q", messages(2), 60, limit=3)
    assert ledger.push(r, "q", messages(2), 60, limit=3) == -1
    assert r.llen("q") == 2 and r.hlen(LEDGER_KEY) == 2


def test_sweep_resends_only_what_is_neither_queued_nor_held() -> None:
    r = fakeredis.FakeRedis()
    queued, held, lost = messages(3)
    ledger.push(r, "q", [queued, held, lost], check_after_s=-1)  # all overdue at once
    # A worker took `held` (kombu recorded it unacked) and `lost` (the record never made it).
    r.lrem("q", 0, held.raw)
    r.lrem("q", 0, lost.raw)
    r.hset(UNACKED_KEY, held.tag, "...")
    assert ledger.sweep(r, "q", check_after_s=60) == 1
    assert r.lrange("q", 0, -1).count(lost.raw.encode()) == 1
    assert r.llen("q") == 2  # `queued` is still there once; `held` was left to kombu
    # Checked again only after another check_after_s: no resend storm.
    assert ledger.sweep(r, "q", check_after_s=60) == 0


def test_a_settled_message_is_never_resent() -> None:
    r = fakeredis.FakeRedis()
    [message] = messages(1)
    ledger.push(r, "q", [message], check_after_s=-1)
    r.delete("q")
    with r.pipeline() as pipe:
        ledger.settle(pipe, [message.id])
        pipe.execute()
    assert ledger.sweep(r, "q", 60) == 0 and r.llen("q") == 0
