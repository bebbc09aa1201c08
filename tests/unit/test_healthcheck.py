"""TCP health probes and the check loop, against real listeners on loopback: what the controller and every
observer judge a target by."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from shadowplane.healthcheck import CheckSpec, ProbeResult, Tracker, probe_tcp, run_check


def spec(address: str, port: int, interval: float = 0.2, fall: int = 3, rise: int = 2) -> CheckSpec:
    return CheckSpec(
        service="web", target="h1", kind="tcp", address=address, port=port, interval=interval,
        timeout=0.2, fall=fall, rise=rise,
    )  # fmt: skip


def free_port(family: socket.AddressFamily = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "localhost"])
def test_a_tcp_probe_is_up_while_the_port_listens_and_down_once_it_does_not(address: str) -> None:
    family = socket.AF_INET6 if address == "::1" else socket.AF_INET

    async def scenario() -> tuple[ProbeResult, ProbeResult, int]:
        accepted = 0

        def on_client(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            w.close()

        server = await asyncio.start_server(on_client, "::1" if family == socket.AF_INET6 else "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        up = await probe_tcp(spec(address, port))
        await asyncio.sleep(0.05)
        server.close()
        await server.wait_closed()
        down = await probe_tcp(spec(address, port))
        return up, down, accepted

    up, down, accepted = asyncio.run(scenario())
    assert up.ok and up.detail == "connected", up
    assert accepted == 1, "the probe really connected to the listener"
    assert not down.ok and down.detail.startswith("connect failed"), down


def test_the_check_loop_turns_probes_into_verdicts_with_fall_and_rise() -> None:
    script = [True, True, False, False, True, False, False, False, True, True]
    seen: list[tuple[bool | None, bool]] = []

    async def probe() -> ProbeResult:
        ok = script[len(seen)] if len(seen) < len(script) else True
        return ProbeResult(ok, "ok" if ok else "refused", 0.0)

    def report(_s: CheckSpec, t: Tracker, changed: bool) -> None:
        seen.append((t.up, changed))

    async def scenario() -> None:
        task = asyncio.create_task(run_check(spec("127.0.0.1", 1, interval=0.005), probe, report))
        while len(seen) < len(script):
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    verdicts = [up for up, _ in seen[: len(script)]]
    # up after 2 successes; a single failure (or two) moves nothing; down at the third in a row; up again
    # after two successes
    assert verdicts == [None, True, True, True, True, True, True, False, False, True]
    assert [i for i, (_, changed) in enumerate(seen[: len(script)]) if changed] == [1, 7, 9]


def test_probes_start_on_a_fixed_cadence_while_a_slow_probe_is_still_running() -> None:
    started: list[float] = []

    async def slow_probe() -> ProbeResult:
        started.append(time.monotonic())
        await asyncio.sleep(0.1)  # five intervals
        return ProbeResult(False, "timeout", 0.1)

    async def scenario() -> None:
        task = asyncio.create_task(
            run_check(spec("127.0.0.1", 1, interval=0.02), slow_probe, lambda *a: None)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(started) >= 8, f"{len(started)} probes started in 0.3 s at a 0.02 s interval"


def test_a_report_that_raises_ends_the_check_with_its_error() -> None:
    async def probe() -> ProbeResult:
        return ProbeResult(True, "connected", 0.0)

    def report(_s: CheckSpec, _t: Tracker, _c: bool) -> None:
        raise RuntimeError("caller's bug")

    async def scenario() -> None:
        await asyncio.wait_for(run_check(spec("127.0.0.1", 1, interval=0.01), probe, report), 5)

    with pytest.raises(RuntimeError, match="caller's bug"):
        asyncio.run(scenario())
