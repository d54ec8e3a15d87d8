"""ModelPool without HTTP or weights: a fake loader counts loads and a fake scheduler records closes."""

import asyncio

import pytest

from corral.errors import ConfigError
from corral.server.pool import LoadedModel, ModelNotFound, ModelPool, parse_keep_alive


class FakeScheduler:
    def __init__(self):
        self.closed = False
        self.running = self.queued = 0

    def close(self):
        self.closed = True


class FakeStore:
    def __init__(self, names):
        from corral.store.names import parse_name

        self.names = {parse_name(n) for n in names}

    def manifest_path(self, name):
        class P:
            def __init__(self, ok):
                self.ok = ok

            def is_file(self):
                return self.ok

        return P(name in self.names)


def make_pool(names=("a", "b", "c"), **kwargs):
    loads = []

    def loader(store, key, path, options):
        loads.append(key)
        return LoadedModel(key, llm=None, scheduler=FakeScheduler(), digest="sha256:" + "0" * 64, size_bytes=1,
                           loaded_at=0.0)

    return ModelPool(FakeStore(names), loader=loader, **kwargs), loads


@pytest.mark.parametrize("value, seconds", [
    (None, None), (300, 300.0), (-1, -1.0), ("0", 0.0), ("10m", 600.0), ("1h30m", 5400.0), ("-1m", -60.0),
    ("250ms", 0.25), ("1.5h", 5400.0), ("42", 42.0),
])
def test_parse_keep_alive_accepts_numbers_and_durations(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["10 minutes", "m", "5x", True, [], float("nan"), "1h-3m"])
def test_parse_keep_alive_rejects_garbage(value):
    with pytest.raises(ConfigError, match="keep_alive"):
        parse_keep_alive(value)


def test_pool_loads_once_for_concurrent_requests():
    pool, loads = make_pool()

    async def main():
        models = await asyncio.gather(*[pool.get("a") for _ in range(5)])
        assert len({id(m) for m in models}) == 1
        assert models[0].active == 5

    asyncio.run(main())
    assert loads == ["a:latest"]


def test_pool_evicts_least_recently_used_past_max_loaded():
    pool, loads = make_pool(max_loaded=2)

    async def main():
        a = await pool.get("a")
        pool.release(a)
        b = await pool.get("b")
        pool.release(b)
        pool.release(await pool.get("a"))  # a is now the most recent
        c = await pool.get("c")
        pool.release(c)
        return a, b

    a, b = asyncio.run(main())
    assert [m.name for m in pool.loaded()] == ["a:latest", "c:latest"]
    assert b.scheduler.closed and not a.scheduler.closed


def test_pool_drains_an_evicted_model_until_its_requests_end():
    pool, _ = make_pool(max_loaded=1)

    async def main():
        a = await pool.get("a")  # held: a request is running on it
        b = await pool.get("b")  # evicts a
        assert pool.draining() == [a] and not a.scheduler.closed
        pool.release(a)
        assert a.scheduler.closed and pool.draining() == []
        pool.release(b)

    asyncio.run(main())


def test_pool_keep_alive_zero_unloads_after_the_request():
    pool, _ = make_pool()

    async def main():
        a = await pool.get("a", keep_alive=0)
        pool.release(a)
        assert a.scheduler.closed and pool.loaded() == []

    asyncio.run(main())


def test_pool_keep_alive_expires_idle_models_only():
    pool, _ = make_pool(keep_alive=10)

    async def main():
        a = await pool.get("a")
        b = await pool.get("b", keep_alive=-1)
        pool.release(a)
        pool.release(b)
        assert pool.expire(now=a.expires_at - 1) == []
        assert pool.expire(now=a.expires_at + 1) == ["a:latest"]
        assert b.expires_at is None and pool.expire(now=1e12) == []

    asyncio.run(main())


def test_pool_unknown_model_is_not_found():
    pool, loads = make_pool()
    with pytest.raises(ModelNotFound, match="nope"):
        asyncio.run(pool.get("nope"))
    assert loads == []


def test_pool_unload_reports_whether_it_was_loaded():
    pool, _ = make_pool()

    async def main():
        pool.release(await pool.get("a"))
        return await pool.unload("a"), await pool.unload("a")

    assert asyncio.run(main()) == (True, False)
