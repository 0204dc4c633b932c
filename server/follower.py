"""Multi-host serving: process 0 serves and forwards the commands it applies; the other processes follow.

Every process of a `jax.distributed` group runs the same engine (`jaxpaged.distributed`), so what has to match is
the sequence of add/abort commands between steps. Process 0's engine thread sends, once per loop iteration, the
commands it applied (adds the engine accepted or rejected alike) to every follower over a
`multiprocessing.connection` socket; a follower applies them and steps whenever its engine has work, so every
process takes the same steps with the same inputs. A socket rather than `multihost_utils.broadcast_one_to_all`:
that is a device collective of fixed shape, which would stall the host loop on the device every step and need the
payload size agreed first; a pickled message on a socket costs a fraction of a millisecond and keeps the host
loop asynchronous. The channel listens on the coordinator's host at its port + 1 (`JAXPAGED_CLUSTER_KEY`, if set,
is its authentication key).

A follower whose channel closes (process 0 exited or died) exits with an error; process 0 stops serving when a
follower's channel breaks, and JAX's heartbeat ends whichever process is left waiting in a collective.
"""

import logging
import os
import time
from multiprocessing.connection import Client, Connection, Listener

logger = logging.getLogger(__name__)

CONNECT_SECONDS = 900  # a follower waits this long for process 0 to build its engine and listen


def _channel_address(coordinator: str) -> tuple[str, int]:
    host, port = coordinator.rsplit(":", 1)
    return host, int(port) + 1


def _key() -> bytes:
    return os.environ.get("JAXPAGED_CLUSTER_KEY", "jaxpaged").encode()


class LeaderChannel:
    """Process 0's end: accepts every follower, then sends each loop iteration's commands to all of them."""

    def __init__(self, coordinator: str, num_followers: int):
        host, port = _channel_address(coordinator)
        self._listener = Listener(("0.0.0.0", port), authkey=_key())
        logger.info("Waiting for %d follower process(es) on %s:%d", num_followers, host, port)
        self._conns: list[Connection] = [self._listener.accept() for _ in range(num_followers)]
        logger.info("All %d follower process(es) connected", num_followers)

    def send(self, commands: list) -> None:
        """Raises OSError (BrokenPipeError, ...) when a follower is gone."""
        for conn in self._conns:
            conn.send(commands)

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._listener.close()


def _connect(coordinator: str) -> Connection:
    address, deadline = _channel_address(coordinator), time.monotonic() + CONNECT_SECONDS
    while True:
        try:
            return Client(address, authkey=_key())
        except (ConnectionRefusedError, FileNotFoundError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"process 0 did not open its command channel at {address[0]}:{address[1]} "
                                   f"within {CONNECT_SECONDS} s") from None
            time.sleep(0.5)


def apply_command(engine, kind: str, request_id: str, payload) -> None:
    """One add or abort, as the engine thread of process 0 applied it (a rejected add is rejected here too)."""
    from jaxpaged.beam_search import BeamSearchParams

    if kind == "abort":
        engine.abort_request([request_id])
        return
    prompt, params = payload
    try:
        if isinstance(params, BeamSearchParams):
            engine.add_beam_request(request_id, prompt, params)
        else:
            engine.add_request(request_id, prompt, params)
    except ValueError:
        pass


def run_follower(args) -> int:
    """Process `args.process_id` > 0 of a multi-host server: builds the same engine, then mirrors process 0's
    commands and steps until process 0 stops (0) or its channel breaks (1)."""
    from jaxpaged import distributed
    from jaxpaged.engine import LLMEngine

    engine = LLMEngine(args)
    engine.warm_up()
    coordinator = distributed.group_from(args.coordinator_address, args.num_processes, args.process_id)[0]
    conn = _connect(coordinator)
    logger.info("Following process 0 (%s)", coordinator)
    while True:
        try:
            commands = conn.recv()
        except (EOFError, OSError) as e:
            logger.error("Process 0's command channel closed (%s): it exited or died; stopping.", e or "EOF")
            return 1
        for kind, request_id, payload in commands:
            if kind == "stop":
                logger.info("Process 0 stopped; stopping.")
                return 0
            apply_command(engine, kind, request_id, payload)
        if engine.has_unfinished_requests():
            engine.step()
