import asyncio

from redis import exceptions as redis_errors

from broker.events import StreamHub, event_type, parse_entry
from broker.keys import Keys


def test_a_follower_reads_seq_from_the_entry_id_and_type_without_parsing():
    data = '{"seq":12,"job":"ab","ts":1.5,"type":"token","text":"\\"type\\":\\"done\\""}'
    event = parse_entry(b"12-1", {b"event": data.encode()})
    assert (event.seq, event.type, event.data) == (12, "token", data)


def test_every_event_type_is_read_back_exactly():
    for type_ in ("queued", "started", "token", "stage", "done", "error", "cancelled"):
        assert event_type(f'{{"seq":0,"job":"j","ts":1.0,"type":"{type_}"}}') == type_


class CancelTurnedTimeout:
    """A Redis client whose blocking XREAD, when cancelled, raises redis-py's TimeoutError
    (as redis-py can, mid-read), until `relent`."""

    def __init__(self) -> None:
        self.relent = False
        self.blocked = 0

    async def xread(self, streams, count=None, block=None):
        if block is None:
            return []  # a follower's catch-up: nothing yet
        self.blocked += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if self.relent:
                raise
            raise redis_errors.TimeoutError("Timeout reading from 127.0.0.1:6379") from None

    def pipeline(self, transaction=True):
        return self

    def xadd(self, *args, **kwargs):
        return self

    def expire(self, *args, **kwargs):
        return self

    async def execute(self):
        return []


def test_closing_the_shared_reader_stops_it_even_when_redis_py_turns_the_cancel_into_an_error():
    async def go():
        client = CancelTurnedTimeout()
        hub = StreamHub(client, Keys("unit"))  # type: ignore[arg-type]

        async def follow():
            async for _ in hub.follow("job", -1, block_s=5):
                pass

        follower = asyncio.create_task(follow())
        while not client.blocked:
            await asyncio.sleep(0.01)
        follower.cancel()
        closing = asyncio.create_task(hub.close())
        done, _ = await asyncio.wait({closing}, timeout=2)
        client.relent = True  # let a reader that kept going stop, so the test ends
        if not done:
            hub._task.cancel()  # type: ignore[union-attr]
            await asyncio.wait({closing}, timeout=5)
        return bool(done), client.blocked

    closed, reads = asyncio.run(go())
    assert closed and reads == 1
