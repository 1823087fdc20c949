"""The openai backend's connection pool: sized by the configured concurrency, split into small httpx pools."""

import asyncio
import ssl
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from persllm.llm import LLMConfig, make_backend, run_sync
from persllm.llm import openai_backend as ob
from tests.fake_openai import FakeOpenAI

USER = [{"role": "user", "content": "Who keeps the light?"}]


def backend(server: FakeOpenAI, concurrency: int) -> Any:
    cfg = LLMConfig(backend="openai", model="fake-model", base_url=server.base_url, concurrency=concurrency)
    return make_backend(cfg)


def recording_pool(size: int, shard: int) -> tuple[ob.ClientPool, list[httpx.Limits]]:
    given: list[httpx.Limits] = []

    def make(limits: httpx.Limits) -> Any:
        given.append(limits)
        return object()  # a stand-in client: the pool only hands it out

    return ob.ClientPool(make, size, shard), given


@pytest.mark.parametrize("size", [1, 3, 8, 9, 17, 64, 100])
def test_pool_limits_follow_the_configured_concurrency(size: int) -> None:
    pool, given = recording_pool(size, shard=8)
    connections = [limits.max_connections or 0 for limits in given]
    assert len(given) == len(pool.clients) == -(-size // 8)  # as few clients as the shard size allows
    assert all(c == pool.per_client <= 8 for c in connections)  # near-equal pools, none above the shard
    assert size <= sum(connections) < size + len(given)  # room for every slot, hardly more
    assert all(limits.max_keepalive_connections == limits.max_connections for limits in given)


def test_leases_go_to_the_least_busy_client_and_never_overfill_one() -> None:
    pool, _ = recording_pool(64, shard=8)
    with ExitStack() as stack:
        leased = [stack.enter_context(pool.lease()) for _ in range(64)]
        # Every client got exactly its pool's worth: with 64 slots no lease finds its client full.
        assert [leased.count(client) for client in pool.clients] == [8] * 8
        assert pool.busy == [8] * 8
    assert pool.busy == [0] * 8
    with pool.lease() as first, pool.lease() as second:
        assert first is not second  # spread over clients, not stacked on one


def test_64_concurrent_calls_reuse_64_keepalive_connections() -> None:
    async def rounds(llm: Any) -> list[Any]:
        done = []
        for round_ in range(3):
            calls = [llm.generate([{"role": "user", "content": f"{round_}-{i}"}], {}) for i in range(64)]
            done += await asyncio.gather(*calls)
        await llm.aclose()
        return done

    with FakeOpenAI(latency=0.2) as server:
        replies = run_sync(rounds(backend(server, concurrency=64)))
    assert len({reply.text for reply in replies}) == 192
    assert server.max_in_flight == 64  # the pools together allow the configured concurrency ...
    assert server.connections == 64  # ... on keep-alive connections opened once, never more


def test_more_calls_than_slots_stay_within_the_slots() -> None:
    async def burst(llm: Any) -> list[Any]:
        return await asyncio.gather(
            *[llm.generate([{"role": "user", "content": str(i)}], {}) for i in range(40)]
        )

    with FakeOpenAI(latency=0.1) as server:
        replies = run_sync(burst(backend(server, concurrency=12)))
    assert [r.text for r in replies] == [f"You said: {i}" for i in range(40)]
    assert server.max_in_flight == 12 and server.connections == 12


def test_a_stream_holds_its_lease_until_it_is_read() -> None:
    async def read(llm: Any) -> tuple[list[int], list[int]]:
        during: list[int] = []
        async for _ in llm.stream(USER, {}):
            during.append(sum(llm._pool.busy))
        return during, list(llm._pool.busy)

    with FakeOpenAI(default_reply="one two three") as server:
        during, after = run_sync(read(backend(server, concurrency=16)))
    assert during == [1, 1, 1] and after == [0, 0]


def test_clients_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[Any] = []
    real = ssl.SSLContext.load_verify_locations

    def counting(self: ssl.SSLContext, *args: Any, **kwargs: Any) -> None:
        loads.append(args or kwargs)
        real(self, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations", counting)

    async def one(llm: Any) -> str:
        done = await llm.generate(USER, {})
        assert len(llm._pool.clients) == 4
        await llm.aclose()
        return str(done.text)

    with FakeOpenAI() as server:
        assert run_sync(one(backend(server, concurrency=32))).startswith("You said")
    assert len(loads) == 1  # the CA certificates are loaded once, not once per client
