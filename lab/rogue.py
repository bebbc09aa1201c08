"""A rogue host for the fault-injection suite: it sends what a compromised or confused host could send.

    python -m lab.rogue --observer 10.77.0.2:7400 --observer 10.77.0.21:7401 ... --service web \\
        --as s2 [--ca ca.pem --cert agent-s2.pem --key agent-s2.key | --ca ca.pem | (nothing: plaintext)] \\
        --controller 10.77.0.2:7400 --owner p1 --seconds 3

Every `--interval` for `--seconds` it sends `Lease.Renew` to every observer:
- for the service, with a huge token (2^62) and its own name as the holder (the attack that used to make
  every observer grant it and lock the real owner out);
- for the service in the owner's name (renewing for someone else);
- for a service that does not exist and a token of 2^63 - 1;
and, with `--controller`, it opens the agent stream as `--as` and says the owner is down (health and lease
observations: one observer's "votes" for a failover) and answers made-up vote commands. It prints one JSON
object: how many of each it sent, how many were granted (a grant of the huge token is the safety hole) and
the errors it got. It runs from any lab namespace; credentials as given (an agent certificate of a fleet
host, a CA only, which presents no client certificate, or none at all: plaintext).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from shadowplane.pki import ROLE_SAN
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import agent_pb2_grpc as agrpc
from shadowplane.v1 import lease_pb2 as lpb
from shadowplane.v1 import lease_pb2_grpc as lgrpc

HUGE_TOKEN = 2**62


def channel(target: str, role: str, ca: Path | None, cert: Path | None, key: Path | None) -> grpc.Channel:
    options = [("grpc.enable_http_proxy", 0), ("grpc.enable_retries", 0)]
    if ca is None:
        return grpc.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(target, creds, options=[*options, ("grpc.ssl_target_name_override", role)])


def renewals(args: argparse.Namespace) -> list[tuple[str, lpb.RenewRequest]]:
    return [
        (
            "huge-token-own-name",
            lpb.RenewRequest(service=args.service, token=HUGE_TOKEN, holder=args.as_host),
        ),
        ("in-owner-name", lpb.RenewRequest(service=args.service, token=HUGE_TOKEN, holder=args.owner)),
        ("other-service", lpb.RenewRequest(service="no-such-service", token=2**63 - 1, holder=args.as_host)),
    ]


def stream_messages(
    args: argparse.Namespace, stop: threading.Event, sent: collections.Counter[str]
) -> Iterator[apb.AgentMessage]:
    yield apb.AgentMessage(hello=apb.Hello(host=args.as_host, agent_version="rogue", instance_id="rogue"))
    n = 0
    while not stop.wait(args.interval):
        n += 1
        now_ms = int(time.time() * 1000)
        for kind in ("health", "lease"):
            sent[f"observation-{kind}"] += 1
            yield apb.AgentMessage(
                observation=apb.Observation(
                    service=args.service,
                    target=args.owner,
                    up=False,
                    detail="rogue: owner down",
                    since_unix_ms=now_ms - 5000,
                    kind=kind,
                    token=HUGE_TOKEN if kind == "lease" else 0,
                )
            )
        sent["vote-reply"] += 1
        yield apb.AgentMessage(
            result=apb.CommandResult(
                command_id=f"c{n}", ok=True, vote=apb.VoteReply(granted=True, promised_token=HUGE_TOKEN)
            )
        )


def run_stream(args: argparse.Namespace, stop: threading.Event, out: dict[str, object]) -> None:
    sent: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    received = 0
    ch = channel(args.controller, ROLE_SAN["controller"], args.ca, args.cert, args.key)
    try:
        stream = agrpc.AgentStreamStub(ch).Connect(
            stream_messages(args, stop, sent), timeout=args.seconds + 1
        )
        for _ in stream:
            received += 1
    except grpc.RpcError as e:
        if isinstance(e, grpc.Call) and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # the end of the run: the controller had kept the stream open
        errors.append(f"{e.code().name}: {e.details()}" if isinstance(e, grpc.Call) else str(e))
    finally:
        ch.close()
        out.update(stream_sent=dict(sent), stream_received=received, stream_errors=errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.rogue", description=__doc__.split("\n")[0])
    p.add_argument("--observer", action="append", required=True, help="HOST:PORT of a Lease service")
    p.add_argument("--service", required=True)
    p.add_argument("--as", dest="as_host", required=True, help="the name it renews and connects as")
    p.add_argument("--owner", required=True, help="the service's real owner")
    p.add_argument("--controller", help="also open the agent stream here and report the owner down")
    p.add_argument("--ca", type=Path)
    p.add_argument("--cert", type=Path)
    p.add_argument("--key", type=Path)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--interval", type=float, default=0.05)
    args = p.parse_args(argv)
    out: dict[str, object] = {}
    stop = threading.Event()
    streamer = None
    if args.controller:
        streamer = threading.Thread(target=run_stream, args=(args, stop, out), daemon=True)
        streamer.start()
    stubs = {
        o: lgrpc.LeaseStub(channel(o, ROLE_SAN["agent"], args.ca, args.cert, args.key)) for o in args.observer
    }
    # the controller's certificate names the controller's role, an agent's the agent role
    if args.controller and args.controller in stubs:
        stubs[args.controller] = lgrpc.LeaseStub(
            channel(args.controller, ROLE_SAN["controller"], args.ca, args.cert, args.key)
        )
    sent: collections.Counter[str] = collections.Counter()
    granted: collections.Counter[str] = collections.Counter()
    errors: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        for what, req in renewals(args):
            for obs, stub in stubs.items():
                sent[what] += 1
                try:
                    reply = stub.Renew(req, timeout=0.5)
                except grpc.RpcError as e:
                    code = e.code().name if isinstance(e, grpc.Call) else "error"
                    errors[f"{what} @ {obs}: {code}"] += 1
                    continue
                if reply.granted:
                    granted[f"{what} @ {obs}"] += 1
        time.sleep(args.interval)
    stop.set()
    if streamer is not None:
        streamer.join(5)
    out.update(renew_sent=dict(sent), renew_granted=dict(granted), renew_errors=dict(errors))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
