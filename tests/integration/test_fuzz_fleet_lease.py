"""Every RPC of the Fleet and Lease services, fuzzed with generated messages against the real daemons: a
controller and an observer agent (no BPF, no root) started as processes, over mutual TLS on loopback.

Whatever a caller sends, it is answered: OK with a sane reply, or an error with a status that says what is
wrong (never UNKNOWN or INTERNAL, which is an unhandled exception, and never a hang: every call has a
deadline), and a detail that names the field. Afterwards both daemons still run, still answer ListHosts
and renewals, and nothing already recorded is lost.

The operator's certificate is used for Fleet, so the changing calls (Failover, Failback, SetOverride) get
past the permission check and really run; agents' certificates for Lease. Nothing here can move a VIP: the
only agent connected is an observer, neither the primary nor a shadow. Examples are derandomized (CI sees
the same ones every run) and few enough to keep the whole file within about half a minute.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.scaling.override import KINDS
from lab.procs import free_port, wait_for_port
from shadowplane.pki import init_ca, issue
from shadowplane.tls import TlsConfig, sync_channel
from shadowplane.v1 import fleet_pb2 as fpb
from shadowplane.v1 import fleet_pb2_grpc as fgrpc
from shadowplane.v1 import lease_pb2 as lpb
from shadowplane.v1 import lease_pb2_grpc as lgrpc
from tests.protobuf_strategies import messages, near, wire
from tests.support import Daemon, wait_until

# The names of things that exist (and of some that do not), so generated requests also reach past lookups.
NAMES = ("web", "p1", "s1", "obs1", "obs1/web", "p1/web", "controller", "ghost", "pin", "bound", "clear")
# What a well-handled bad request is answered with. UNKNOWN and INTERNAL mean an exception escaped;
# RESOURCE_EXHAUSTED, that a detail was too big to travel (it quoted a huge value whole), as no request
# here comes near the size limit.
CLEAR_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
DEADLINE = 10.0  # a call still unanswered after this is a hang
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


@dataclass
class Fleet:
    controller: Daemon
    agent: Daemon
    port: int  # the controller's: Fleet, Lease
    peer_port: int  # the observer agent's: Lease
    pki: Path

    def tls(self, who: str) -> TlsConfig:
        return TlsConfig(ca=self.pki / "ca.pem", cert=self.pki / f"{who}.pem", key=self.pki / f"{who}.key")

    @contextlib.contextmanager
    def channel(self, port: int, who: str) -> Iterator[grpc.Channel]:
        role = "controller" if port == self.port else "agent"
        with sync_channel(f"127.0.0.1:{port}", self.tls(who), role) as ch:
            yield ch

    @contextlib.contextmanager
    def fleet(self, who: str = "operator-alice") -> Iterator[fgrpc.FleetStub]:
        with self.channel(self.port, who) as ch:
            yield fgrpc.FleetStub(ch)

    @contextlib.contextmanager
    def lease(self, port: int, who: str) -> Iterator[lgrpc.LeaseStub]:
        with self.channel(port, who) as ch:
            yield lgrpc.LeaseStub(ch)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fuzz")
    pki = tmp / "tls"
    init_ca(pki)
    issue(pki, "ctl", "controller", ("127.0.0.1",))
    issue(pki, "alice", "operator")
    for host in ("p1", "obs1"):
        issue(pki, host, "agent")
    port, peer_port, closed = free_port(), free_port(), free_port()
    tls = f'[tls]\nca = "{pki}/ca.pem"\ncert = "{pki}/%s.pem"\nkey = "{pki}/%s.key"\n'
    hosts = "".join(f'[[host]]\nname = "{h}"\naddress = "127.0.0.1"\n' for h in ("p1", "s1", "obs1"))
    (tmp / "controller.toml").write_text(
        f'listen = "127.0.0.1:{port}"\n[store]\npath = "{tmp}/c.db"\n'
        + tls % ("controller-ctl", "controller-ctl")
        # nobody is placed on a shadow and no scaling cycle runs while the fuzzing goes on
        + "[failover]\nplacement_grace_seconds = 3600\n[scaling]\ninterval_seconds = 3600\n"
        + hosts
        + '[[service]]\nname = "web"\nprimary = "p1"\nshadows = ["s1"]\nobservers = ["controller", "obs1"]\n'
        + f'vip = "10.99.0.1/24"\nfailback = "manual"\n[service.health]\nport = {closed}\n'
    )
    # obs1 observes `web` and has one workload (so an override can be accepted); its cgroup files are a
    # directory of this test's, read without root
    cgroups = tmp / "cgroup"
    (cgroups / "fuzz-web").mkdir(parents=True)
    (cgroups / "cgroup.controllers").write_text("cpu memory io\n")
    (tmp / "agentd.toml").write_text(
        f'controller = "127.0.0.1:{port}"\nhost = "obs1"\npeer_listen = "127.0.0.1:{peer_port}"\n'
        f'interval_seconds = 1\nreconnect_max_seconds = 0.5\ncgroup_root = "{cgroups}"\n'
        f'hooks_dir = "{tmp}/hooks"\n'
        + tls % ("agent-obs1", "agent-obs1")
        + "[capture]\nbpf = false\ncreate_cgroups = false\n"
        + '[[workload]]\nname = "web"\ncgroup = "/fuzz-web"\nrole = "shadow"\nservice = "web"\n'
    )
    controller = Daemon("controller.cli", tmp / "controller.toml", tmp / "controller.log").start()
    agent = Daemon("agentd.cli", tmp / "agentd.toml", tmp / "agentd.log")
    try:
        wait_for_port("127.0.0.1", port, 20, controller.proc)
        agent.start()
        wait_for_port("127.0.0.1", peer_port, 20, agent.proc)
        f = Fleet(controller, agent, port, peer_port, pki)
        with f.fleet() as stub:
            wait_until(
                lambda: any(h.connected for h in stub.ListHosts(fpb.ListHostsRequest(), timeout=5).hosts),
                20,
                "obs1 to connect",
            )
        yield f
        assert controller.alive(), controller.log_text()[-3000:]
        assert agent.alive(), agent.log_text()[-3000:]
    finally:
        agent.stop()
        controller.stop()


# ---- the property ----


def field_names(descriptor: Descriptor) -> set[str]:
    out = set()
    for fd in descriptor.fields:
        out.add(fd.name)
        if fd.message_type is not None and not fd.message_type.GetOptions().map_entry:
            out |= {f"{fd.name}.{sub.name}" for sub in fd.message_type.fields}
    return out


def answered_clearly(
    request: Message | bytes, call: Callable[[], Any], sent_as: Descriptor | None = None
) -> Any | None:
    """The reply, or None for a clear refusal; anything else fails the test. An error's detail starts with
    the field it is about ("request" for the whole of it)."""
    try:
        return call()
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {DEADLINE}s: a hang"
        assert code in CLEAR_ERRORS, f"{code.name}: {details[:500]} for {request!r:.500}"
        assert details.strip(), f"{code.name} without a detail"
        if code != grpc.StatusCode.PERMISSION_DENIED:  # which says which certificate it needs instead
            named = details.split(":", 1)[0]
            fields = field_names(sent_as or request.DESCRIPTOR)  # type: ignore[union-attr]
            assert named in {*fields, "request"}, f"{details!r} does not start with a field of the request"
        return None


@dataclass(frozen=True)
class Recorded:
    events: int
    last_id: int
    logs: tuple[int, int]  # how much the controller and the agent had logged


def recorded(fleet: Fleet) -> Recorded:
    with fleet.fleet() as stub:
        evs = stub.ListEvents(fpb.ListEventsRequest(limit=10_000), timeout=DEADLINE).events
    logs = (len(fleet.controller.log_text()), len(fleet.agent.log_text()))
    return Recorded(len(evs), max((e.id for e in evs), default=0), logs)


def still_serving(fleet: Fleet, before: Recorded) -> None:
    """Both daemons run and answer as before, and no recorded event is gone."""
    assert fleet.controller.alive(), fleet.controller.log_text()[-3000:]
    assert fleet.agent.alive(), fleet.agent.log_text()[-3000:]
    for daemon, start in zip((fleet.controller, fleet.agent), before.logs, strict=True):
        since = daemon.log_text()[start:]
        assert "Traceback" not in since, f"an exception escaped in {daemon.module}:\n{since[-5000:]}"
    with fleet.fleet() as stub:
        hosts = stub.ListHosts(fpb.ListHostsRequest(), timeout=DEADLINE).hosts
        assert {h.host for h in hosts if h.connected} == {"obs1"}
        kept = stub.ListEvents(fpb.ListEventsRequest(limit=10_000), timeout=DEADLINE).events
        assert len([e for e in kept if e.id <= before.last_id]) == before.events, "recorded events were lost"
        assert stub.GetPlan(fpb.GetPlanRequest(), timeout=DEADLINE).next_cycle_unix_ms > 0
    # a renewal is answered, granted or not (the fuzzing may have left an observer promised to a newer token)
    renewal = lpb.RenewRequest(service="web", token=1, holder="p1")
    for port in (fleet.port, fleet.peer_port):
        with fleet.lease(port, "agent-p1") as lease:
            reply = answered_clearly(renewal, functools.partial(lease.Renew, renewal, timeout=DEADLINE))
            assert reply is None or reply.observer in ("controller", "obs1")


@pytest.fixture
def before(fleet: Fleet) -> Iterator[Recorded]:
    rec = recorded(fleet)
    yield rec
    still_serving(fleet, rec)


# ---- Fleet: what each reply must look like when it is OK ----


def sane_hosts(req: fpb.ListHostsRequest, r: fpb.ListHostsResponse) -> None:
    names = [h.host for h in r.hosts]
    assert len(names) == len(set(names)) and "obs1" in names


def sane_telemetry(req: fpb.GetTelemetryRequest, r: fpb.GetTelemetryResponse) -> None:
    assert all(s.host == req.host for s in r.samples)
    if req.workload:
        assert all(s.sample.workload == req.workload for s in r.samples)
    per_workload: dict[str, int] = {}
    for s in r.samples:
        per_workload[s.sample.workload] = per_workload.get(s.sample.workload, 0) + 1
    assert all(n <= (req.limit or 60) for n in per_workload.values())


def sane_services(req: fpb.ListServicesRequest, r: fpb.ListServicesResponse) -> None:
    assert [s.name for s in r.services] == ([req.service] if req.service else ["web"])


def sane_transition(req: Message, r: fpb.TransitionReply) -> None:
    assert r.reason, "a transition reply says why"


def sane_events(req: fpb.ListEventsRequest, r: fpb.ListEventsResponse) -> None:
    ids = [e.id for e in r.events]
    assert ids == sorted(ids) and all(i > req.after_id for i in ids)
    assert len(ids) <= (req.limit or 100)
    assert all(e.service == req.service for e in r.events) if req.service else True


def sane_plan(req: fpb.GetPlanRequest, r: fpb.GetPlanResponse) -> None:
    for d in [*r.next, *r.last]:
        assert all(math.isfinite(v) for v in (d.predicted, d.old, d.new, d.applied, *d.forecast.values()))
    for s in r.shadows:
        assert math.isfinite(s.cpu_cores)
        assert math.isfinite(s.override.cpu_cores) and math.isfinite(s.override.cpu_max)


def sane_override(req: fpb.Override, r: fpb.OverrideReply) -> None:
    assert r.reason
    if r.accepted:
        assert req.kind in KINDS and (req.host, req.workload) == ("obs1", "web")
        values = (req.cpu_cores, req.cpu_min, req.cpu_max)
        assert all(math.isfinite(v) and v >= 0 for v in values), "an accepted override holds numbers"


def sane_zones(req: fpb.ListZonesRequest, r: fpb.ListZonesResponse) -> None:
    assert 0 < r.degraded_share <= 1
    for z in r.zones:
        assert z.zone and z.reason and len(z.down) == len(z.down_reasons) <= len(z.hosts)


def sane_pool_plan(req: fpb.GetPoolPlanRequest, r: fpb.PoolPlan) -> None:
    assert r.solver and r.demand and math.isfinite(r.solve_seconds)
    for c in r.placements:
        assert math.isfinite(c.price_per_hour) and math.isfinite(c.reserved_cores)
        assert c.host_covered <= c.host_scenarios and c.zone_covered <= c.zone_scenarios
    for x in r.services:
        assert math.isfinite(x.cpu_cores)


UNARY: dict[str, Callable[[Any, Any], None]] = {
    "ListHosts": sane_hosts,
    "GetTelemetry": sane_telemetry,
    "ListServices": sane_services,
    "Failover": sane_transition,
    "Failback": sane_transition,
    "ListEvents": sane_events,
    "GetPlan": sane_plan,
    "SetOverride": sane_override,
    "ListZones": sane_zones,
    "GetPoolPlan": sane_pool_plan,
}
FLEET = fpb.DESCRIPTOR.services_by_name["Fleet"]
# Requests that get past the lookups, for `near` to carry hostile values deeper in.
VALID: dict[str, list[Message]] = {
    "ListHosts": [fpb.ListHostsRequest()],
    "GetTelemetry": [fpb.GetTelemetryRequest(host="obs1", workload="web", limit=10)],
    "ListServices": [fpb.ListServicesRequest(service="web")],
    "Failover": [fpb.FailoverRequest(service="web", to="s1", force=True)],
    "Failback": [fpb.FailbackRequest(service="web")],
    "ListEvents": [fpb.ListEventsRequest(service="web", limit=10)],
    "WatchEvents": [fpb.ListEventsRequest(service="web", limit=10)],
    "GetPlan": [fpb.GetPlanRequest(workload="obs1/web", last=5), fpb.GetPlanRequest(workload="web")],
    "ListZones": [fpb.ListZonesRequest()],
    "GetPoolPlan": [fpb.GetPoolPlanRequest()],
    "SetOverride": [
        fpb.Override(host="obs1", workload="web", kind="pin", cpu_cores=0.5, memory_bytes=2**30),
        fpb.Override(host="obs1", workload="web", kind="bound", cpu_min=0.1, cpu_max=2, memory_max=2**31),
        fpb.Override(host="obs1", workload="web", kind="freeze", reason="fuzz"),
        fpb.Override(host="obs1", workload="web", kind="clear"),
    ],
}


def requests(rpc: str) -> st.SearchStrategy[Message]:
    """Any request, and requests that are valid but for a few fields."""
    method = FLEET.methods_by_name[rpc]
    return st.one_of(messages(method.input_type, NAMES), *(near(v, NAMES) for v in VALID[rpc]))


def test_what_the_fuzzing_found_is_refused_naming_the_field(fleet: Fleet, before: Recorded) -> None:
    """Once an unhandled OverflowError (UNKNOWN), an override of NaN cores accepted and stored, a detail
    that named no field; now each is refused with the field and what it must be."""
    with fleet.fleet() as stub:
        for rpc, request, detail in [
            ("ListEvents", fpb.ListEventsRequest(after_id=2**63), "after_id: must be at most 2^63-1"),
            ("WatchEvents", fpb.ListEventsRequest(after_id=2**64 - 1), "after_id: must be at most 2^63-1"),
            ("GetTelemetry", fpb.GetTelemetryRequest(host="obs1", limit=20_000), "limit: must be at most"),
            ("GetTelemetry", fpb.GetTelemetryRequest(), "host: is required"),
            ("ListServices", fpb.ListServicesRequest(service="web/x"), "service: must be a name"),
            (
                "SetOverride",
                fpb.Override(host="obs1", workload="web", kind="pin", cpu_cores=math.nan),
                "cpu_cores: must be a finite number",
            ),
            (
                "SetOverride",
                fpb.Override(host="obs1", workload="web", kind="bound", cpu_max=math.inf),
                "cpu_max: must be a finite number",
            ),
            ("Failover", fpb.FailoverRequest(service="web", to="s1\x00"), "to: must be printable text"),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                reply = getattr(stub, rpc)(request, timeout=DEADLINE)
                list(reply) if rpc == "WatchEvents" else None  # a stream fails when read
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc
            assert (e.value.details() or "").startswith(detail), e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.ListServices(fpb.ListServicesRequest(service="ghost"), timeout=DEADLINE)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert e.value.details() == "service: no service 'ghost' (see shadowctl services)"


def test_every_fleet_rpc_is_fuzzed() -> None:
    assert {m.name for m in FLEET.methods} == {*UNARY, "WatchEvents"}


@pytest.mark.parametrize("rpc", sorted(UNARY))
def test_fleet_rpc_answers_any_request_clearly(fleet: Fleet, before: Recorded, rpc: str) -> None:
    with fleet.fleet() as stub:

        @FUZZ
        @given(request=requests(rpc))
        def check(request: Message) -> None:
            reply = answered_clearly(request, lambda: getattr(stub, rpc)(request, timeout=DEADLINE))
            if reply is not None:
                UNARY[rpc](request, reply)

        check()


@pytest.mark.parametrize("rpc", ["Failover", "Failback", "SetOverride"])
def test_changes_with_an_agent_certificate_are_refused_and_change_nothing(
    fleet: Fleet, before: Recorded, rpc: str
) -> None:
    with fleet.fleet("agent-p1") as stub:

        @settings(FUZZ, max_examples=20)
        @given(request=requests(rpc))
        def check(request: Message) -> None:
            with pytest.raises(grpc.RpcError) as e:
                getattr(stub, rpc)(request, timeout=DEADLINE)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "needs an operator certificate" in (e.value.details() or "")

        check()
        since = stub.ListEvents(fpb.ListEventsRequest(after_id=before.last_id), timeout=DEADLINE).events
    # the observers' health reports go on in the background; nothing else may have been recorded
    assert [e.kind for e in since if e.kind != "health"] == [], "a refused change recorded something"


def test_watch_events_answers_any_request_clearly(fleet: Fleet, before: Recorded) -> None:
    """A watch never ends by itself: it sends what is stored, then waits; the deadline ends it."""
    with fleet.fleet() as stub:

        @settings(FUZZ, max_examples=15)
        @given(request=requests("WatchEvents"))
        def check(request: fpb.ListEventsRequest) -> None:
            got: list[fpb.Event] = []

            def watch() -> None:
                try:
                    got.extend(stub.WatchEvents(request, timeout=0.5))
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise

            answered_clearly(request, watch)
            assert all(e.id > request.after_id for e in got)
            if request.service:
                assert all(e.service == request.service for e in got)

        check()


# ---- Lease: renewals at the controller and at an observer agent's peer port ----


@pytest.mark.parametrize("where", ["controller", "agent"])
def test_renew_answers_any_request_clearly(fleet: Fleet, before: Recorded, where: str) -> None:
    port = fleet.port if where == "controller" else fleet.peer_port
    with fleet.lease(port, "agent-p1") as lease:

        @FUZZ
        @given(
            request=st.one_of(
                messages(lpb.RenewRequest.DESCRIPTOR, NAMES),
                near(lpb.RenewRequest(service="web", token=1, holder="p1"), NAMES),
            )
        )
        def check(request: lpb.RenewRequest) -> None:
            reply = answered_clearly(request, lambda: lease.Renew(request, timeout=DEADLINE))
            if reply is not None:
                assert reply.observer == ("controller" if where == "controller" else "obs1")
                assert reply.valid_for_ms > 0
                assert not reply.granted or (request.holder == "p1" and request.service == "web")

        check()


def test_renew_from_a_certificate_that_is_not_the_holder_is_refused(fleet: Fleet, before: Recorded) -> None:
    for port in (fleet.port, fleet.peer_port):
        with fleet.lease(port, "agent-obs1") as lease:

            @settings(FUZZ, max_examples=15)
            @given(request=messages(lpb.RenewRequest.DESCRIPTOR, ("p1", "s1", "web", "controller")))
            def check(request: lpb.RenewRequest) -> None:
                reply = answered_clearly(request, lambda: lease.Renew(request, timeout=DEADLINE))
                assert reply is None or request.holder == "obs1"

            check()


@pytest.mark.parametrize("where", ["controller", "agent"])
def test_renew_refuses_what_no_owner_sends_naming_the_field(fleet: Fleet, where: str) -> None:
    """A token no store can hold (or none at all) and a nameless service are refused before the lease rules
    see them; a huge holder is refused without its whole value in the error."""
    port = fleet.port if where == "controller" else fleet.peer_port
    with fleet.lease(port, "agent-p1") as lease:
        for request, field in [
            (lpb.RenewRequest(service="web", token=2**63, holder="p1"), "token"),
            (lpb.RenewRequest(service="web", token=2**64 - 1, holder="p1"), "token"),
            (lpb.RenewRequest(service="web", token=0, holder="p1"), "token"),
            (lpb.RenewRequest(service="", token=1, holder="p1"), "service"),
            (lpb.RenewRequest(service="w\neb", token=1, holder="p1"), "service"),
            (lpb.RenewRequest(service="web", token=1, holder="x" * 100_000), "holder"),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                lease.Renew(request, timeout=DEADLINE)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (e.value.details() or "").startswith(f"{field}: must be")


# ---- bytes no protobuf library would send, to every method of both services ----

LEASE = lpb.DESCRIPTOR.services_by_name["Lease"]
METHODS = [(FLEET, m.name, "controller") for m in FLEET.methods] + [
    (LEASE, m.name, where) for m in LEASE.methods for where in ("controller", "agent")
]


@pytest.mark.parametrize(
    ("service", "rpc", "where"), METHODS, ids=[f"{s.name}.{r}@{w}" for s, r, w in METHODS]
)
def test_undecodable_requests_are_refused_clearly(
    fleet: Fleet, before: Recorded, service: Any, rpc: str, where: str
) -> None:
    method = service.methods_by_name[rpc]
    port = fleet.port if where == "controller" else fleet.peer_port
    with fleet.channel(port, "operator-alice" if service is FLEET else "agent-p1") as ch:
        call: Any = (ch.unary_stream if method.server_streaming else ch.unary_unary)(
            f"/{service.full_name}/{rpc}", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )

        def send(raw: bytes) -> object:
            if not method.server_streaming:
                return call(raw, timeout=DEADLINE)
            try:
                return list(call(raw, timeout=0.3))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
                return []

        @settings(FUZZ, max_examples=50)
        @given(raw=wire(method.input_type, NAMES))
        def check(raw: bytes) -> None:
            answered_clearly(raw, lambda: send(raw), method.input_type)

        check()
