"""Tenants on their own: keys, the token rate, concurrency slots and the queue, refunds."""

from __future__ import annotations

import asyncio

import pytest

from faasmoe.serving.config import TenantConfig
from faasmoe.serving.tenants import RateLimited, SlotTimeout, Tenants


def _tenants(**limits) -> Tenants:
    return Tenants([TenantConfig(name="alice", key="sk-alice-0001", **limits),
                    TenantConfig(name="bob", key="sk-bob-00001")])


def test_keys_find_their_tenant_and_nothing_else():
    t = _tenants()
    assert t.authenticate("sk-alice-0001").name == "alice" and t.authenticate(b"sk-bob-00001").name == "bob"
    assert t.authenticate("sk-alice-000") is None and t.authenticate(None) is None and t.authenticate(b"\xff") is None


def test_tokens_are_reserved_at_admission_and_the_unused_part_is_given_back():
    t = _tenants(tokens_per_minute=1000)
    alice = next(iter(t))

    async def run():
        await t.admit(alice, prompt_tokens=100, max_tokens=300, timeout=1)
        assert alice.bucket == pytest.approx(600, abs=1) and alice.in_flight == 1
        t.on_tokens(alice, 50)
        t.release(alice, max_tokens=300, completion_tokens=50, ok=True)
        assert alice.bucket == pytest.approx(850, abs=1) and alice.in_flight == 0
        with pytest.raises(RateLimited, match="ask for fewer"):  # more than a minute's worth at once
            await t.admit(alice, prompt_tokens=100, max_tokens=1000, timeout=1)
        await t.admit(alice, prompt_tokens=100, max_tokens=700, timeout=1)
        with pytest.raises(RateLimited) as e:  # the bucket is spent: come back when it has refilled
            await t.admit(alice, prompt_tokens=10, max_tokens=100, timeout=1)
        assert e.value.retry_after > 0

    asyncio.run(run())
    u = alice.usage
    assert (u.requests, u.completed, u.prompt_tokens, u.completion_tokens, u.rejected) == (2, 1, 200, 50, 2)


def test_a_request_beyond_the_slots_waits_in_line_and_beyond_the_queue_is_refused():
    t = _tenants(max_concurrency=1, max_queued=1)
    alice, bob = list(t)

    async def run():
        await t.admit(alice, 1, 1, timeout=5)
        waiting = asyncio.ensure_future(t.admit(alice, 1, 1, timeout=5))
        await asyncio.sleep(0)
        assert len(alice.waiters) == 1 and not waiting.done()
        with pytest.raises(RateLimited, match="in flight"):
            t.precheck(alice)
        with pytest.raises(RateLimited, match="in flight"):
            await t.admit(alice, 1, 1, timeout=5)
        await t.admit(bob, 1, 1, timeout=5)  # bob's slots are his own
        t.release(alice, 1, 1, ok=True)  # the slot passes to the waiting request
        await asyncio.wait_for(waiting, 1)
        assert alice.in_flight == 1 and not alice.waiters
        late = asyncio.ensure_future(t.admit(alice, 1, 1, timeout=0.05))
        with pytest.raises(SlotTimeout):
            await late
        assert not alice.waiters and alice.in_flight == 1

    asyncio.run(run())
    assert alice.usage.errors == 1  # the one that timed out waiting


def test_a_refused_request_is_undone_and_counted_as_invalid_or_rejected():
    t = _tenants(tokens_per_minute=1000)
    alice = next(iter(t))

    async def run():
        await t.admit(alice, 100, 100, timeout=1)
        t.refuse(alice, 100, 100, status=400)
        await t.admit(alice, 100, 100, timeout=1)
        t.refuse(alice, 100, 100, status=429)

    asyncio.run(run())
    u = alice.usage
    assert (u.requests, u.prompt_tokens, u.invalid, u.rejected, alice.in_flight) == (0, 0, 1, 1, 0)
    assert alice.bucket == pytest.approx(1000, abs=1)
