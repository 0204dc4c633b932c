"""AsyncLLMEngine on its own, over FakeEngine: outputs in order, aborts, isolated failures, shutdown."""

import asyncio
import threading

import pytest

from jaxpaged.config import EngineArgs
from jaxpaged.sampling_params import SamplingParams
from jaxpaged.server.async_engine import AsyncLLMEngine, EngineStepError
from tests.server.fake_engine import FakeEngine


@pytest.fixture
def engines():
    fake = FakeEngine(step_seconds=0.0)
    engine = AsyncLLMEngine(EngineArgs(), engine_factory=lambda args: fake)
    engine.start()
    assert engine.ready.wait(30) and engine.is_ready
    yield engine, fake
    engine.shutdown()


async def collect(engine, prompt, request_id, max_tokens=3):
    return [out async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens), request_id)]


def test_outputs_are_cumulative_and_end_finished(engines):
    engine, _ = engines
    outs = asyncio.run(collect(engine, "x", "r1"))
    assert [o.outputs[0].text for o in outs] == ["a", "ab", "abc"]
    assert [o.finished for o in outs] == [False, False, True]


def test_rejected_request_fails_alone(engines):
    engine, _ = engines

    async def main():
        return await asyncio.gather(collect(engine, "reject me", "bad"), collect(engine, "x", "good"),
                                    return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and good[-1].outputs[0].text == "abc"


def test_step_failure_fails_requests_in_flight_and_loop_goes_on(engines):
    engine, fake = engines
    with pytest.raises(EngineStepError, match="fake device failure"):
        asyncio.run(collect(engine, "boom1", "b"))
    assert asyncio.run(collect(engine, "x", "after"))[-1].finished
    assert fake.idle_steps == 0 and not fake.requests


def test_closing_the_iterator_aborts_the_request(engines):
    engine, fake = engines

    async def main():
        gen = engine.generate("x", SamplingParams(max_tokens=50), "early")
        first = await anext(gen)
        await gen.aclose()
        return first

    assert asyncio.run(main()).outputs[0].text == "a"
    assert fake.abort_event.wait(30) and fake.aborted == ["early"]


def test_shutdown_fails_requests_still_running():
    fake = FakeEngine(step_seconds=0.0)
    engine = AsyncLLMEngine(EngineArgs(), engine_factory=lambda args: fake)
    engine.start()

    async def main():
        gen = engine.generate("hold", SamplingParams(max_tokens=5), "held")
        task = asyncio.ensure_future(anext(gen))
        assert await asyncio.to_thread(fake.added_event.wait, 30)  # the engine thread took the request
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineStepError, match="shutting down"):
            await task

    assert engine.ready.wait(30)
    asyncio.run(main())


def test_idle_work_runs_until_done_between_requests_and_never_beside_one():
    class Idle(FakeEngine):
        """Three pieces of idle work (waits 0, 0.01, 0), then none; records whether a request was unfinished."""

        def __init__(self):
            super().__init__(step_seconds=0.0)
            self.waits, self.calls, self.done = [0.0, 0.01, 0.0], [], threading.Event()

        def run_idle_work(self):
            self.calls.append(self.has_unfinished_requests())
            if not self.waits:
                self.done.set()
                return None
            return self.waits.pop(0)

    fake = Idle()
    engine = AsyncLLMEngine(EngineArgs(), engine_factory=lambda args: fake)
    engine.start()
    try:
        assert engine.ready.wait(30) and fake.done.wait(30)
        assert fake.calls == [False] * 4  # three runs, then nothing left: the loop waits for a request
        outs = asyncio.run(collect(engine, "x", "r1"))
        assert outs[-1].outputs[0].text == "abc" and not any(fake.calls)
    finally:
        engine.shutdown()
