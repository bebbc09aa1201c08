"""What the controller accepts on the agent stream: one pure check per message, naming the field.

Everything an agent sends is checked here before anything reads or stores it, so that one bad value (a NaN,
a counter of 2^63, a workload nobody announced, a timestamp an hour ahead) refuses that one message with a
reason, and never reaches SQLite (which raises on it, ending the stream: the agent would resend the same
batch forever and its host would flap) nor the HA loop's board. A check returns a `Problem` or None; the
stream (controller/ingest.py) turns a problem into a `Reject` and counts it.

Results of commands are checked twice: here for their own values, and by `check_answer` against the command
they claim to answer (a vote answered with an address state is no vote).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import attrgetter

from controller.config import ControllerConfig
from controller.telemetry_schema import values as series_values
from shadowplane.config import NAME_RE
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import telemetry_pb2 as tpb

MAX_COUNTER = 2**63 - 1  # SQLite's INTEGER, and the largest count any kernel counter reaches in practice
MAX_SAMPLES_PER_BATCH = 4096
MAX_WORKLOADS = 1024  # agentd's capture.max_workloads is at most this
MAX_HISTOGRAM_BUCKETS = 64
MAX_MAP_ENTRIES = 1024  # syscalls by name, TCP states, dropped-event reasons
MAX_KEY_CHARS = 64
MAX_TEXT_CHARS = 4096  # details, reasons, errors
MAX_OUTPUT_TAIL_CHARS = 65536  # a hook's output tail
MAX_PATH_CHARS = 4096
MAX_ID_CHARS = 128  # instance and command ids
MAX_SHORT_CHARS = 256  # versions, kernels, zones, peer addresses, units, phases
# Clocks of the fleet are NTP-synchronised; a timestamp further ahead than this is a broken clock or garbage,
# and stored samples "from the future" would be every query's latest for that long.
MAX_CLOCK_AHEAD_MS = 10 * 60 * 1000
MAX_SAMPLE_MS = 24 * 3600 * 1000  # no agent samples over more than a day
MAX_CORES = 65536  # CPU seconds per second of a sample beyond this is garbage (and overflows the series)
HISTOGRAM_UNITS = ("", "ns", "us")
PRESSURES = ("cpu_pressure", "memory_pressure", "io_pressure")
OBSERVATION_KINDS = ("health", "lease")
LEASE_EVENTS = ("lost", "released", "acquired", "resumed")
# The detail each command's result carries when it succeeds (None: none). A failed command may carry none.
ANSWERS: Mapping[str, str | None] = {
    "watch": None,
    "vote": "vote",
    "acquire": "address",
    "release": "address",
    "run_hook": "hook",
    "set_limits": "limits",
}
# Commands whose callers read the detail whatever `ok` says, so it is due even from a command that failed:
# a hook result missing would read as "no hook installed" (found = false), a vote reply as a refusal.
ANSWERED_EVEN_IF_FAILED = frozenset({"vote", "run_hook"})


@dataclass(frozen=True)
class Problem:
    field: str  # where, e.g. "samples[0].resources.cpu_seconds"
    code: str  # short and stable: the `reason` label of the rejected-messages metric
    detail: str  # for people: what is wrong, and the fix where there is one


@dataclass(frozen=True)
class ServiceRoles:
    targets: frozenset[str]  # primary and shadows: who is observed, who may hold its lease
    observers: frozenset[str]  # who judges health
    witnesses: frozenset[str] = frozenset()  # who only keeps its leases (ServiceConfig.lease_quorum)


@dataclass(frozen=True)
class Fleet:
    """What the configuration says the stream may talk about."""

    hosts: frozenset[str]  # empty: any host (development only)
    services: Mapping[str, ServiceRoles]

    @staticmethod
    def of(cfg: ControllerConfig) -> Fleet:
        return Fleet(
            frozenset(h.name for h in cfg.host),
            {
                s.name: ServiceRoles(
                    frozenset([s.primary, *s.shadows]),
                    frozenset(s.observer_names()),
                    frozenset(cfg.lease_quorum(s)) - frozenset(s.observer_names()),
                )
                for s in cfg.service
            },
        )


# ---- values ----


def _name(where: str, v: str) -> Problem | None:
    if not v:
        return Problem(where, "missing", "is empty")
    if not NAME_RE.match(v):
        return Problem(where, "bad_name", f"must be 1-63 of letters, digits, '_', '.', '-' (got {v[:80]!r})")
    return None


def _text(where: str, v: str, limit: int = MAX_TEXT_CHARS, required: bool = False) -> Problem | None:
    if required and not v:
        return Problem(where, "missing", "is empty")
    if len(v) > limit:
        return Problem(where, "too_long", f"{len(v)} characters; at most {limit}")
    if "\x00" in v:
        return Problem(where, "bad_value", "contains a NUL character")
    return None


def _counter(where: str, v: int) -> Problem | None:
    if v > MAX_COUNTER:
        return Problem(where, "too_large", f"{v} does not fit a signed 64-bit counter (at most 2^63-1)")
    return None


def _real(where: str, v: float, high: float = math.inf) -> Problem | None:
    if not math.isfinite(v):
        return Problem(where, "not_finite", f"{v} is not a finite number")
    if v < 0:
        return Problem(where, "negative", f"{v} is negative")
    if v > high:
        return Problem(where, "too_large", f"{v} is above {high:g}")
    return None


def _time(where: str, ms: int, now_ms: int, required: bool = True) -> Problem | None:
    if ms < 0 or (required and ms == 0):
        return Problem(where, "negative" if ms < 0 else "missing", f"{ms} is not a time (Unix milliseconds)")
    if ms > now_ms + MAX_CLOCK_AHEAD_MS:
        return Problem(
            where,
            "future",
            f"{(ms - now_ms) / 1000:.0f} s ahead of the controller's clock: synchronise the clocks (NTP)",
        )
    return None


def _keys(where: str, m: Mapping[str, int]) -> Problem | None:
    if len(m) > MAX_MAP_ENTRIES:
        return Problem(where, "too_long", f"{len(m)} entries; at most {MAX_MAP_ENTRIES}")
    if not m or (max(m.values()) <= MAX_COUNTER and all(0 < len(k) <= MAX_KEY_CHARS for k in m)):
        return None
    for k, n in m.items():
        if not k or len(k) > MAX_KEY_CHARS:
            return Problem(where, "bad_name", f"key {k[:80]!r}: keys are 1-{MAX_KEY_CHARS} characters")
        p = _counter(f"{where}[{k!r}]", n)
        if p:
            return p
    return None


def _first(checks: Iterable[Problem | None]) -> Problem | None:
    """The first problem of lazily evaluated checks."""
    return next((p for p in checks if p is not None), None)


def _histogram(where: str, h: tpb.Log2Histogram) -> Problem | None:
    if len(h.counts) > MAX_HISTOGRAM_BUCKETS:
        return Problem(where, "too_long", f"{len(h.counts)} buckets; at most {MAX_HISTOGRAM_BUCKETS}")
    if h.unit not in HISTOGRAM_UNITS:
        return Problem(f"{where}.unit", "bad_value", f"{h.unit[:80]!r} is none of {HISTOGRAM_UNITS}")
    if not h.counts or max(h.counts) <= MAX_COUNTER:
        return None
    return _first(_counter(f"{where}.counts[{i}]", n) for i, n in enumerate(h.counts))


def _features(where: str, features: Sequence[tpb.CaptureFeature]) -> Problem | None:
    if len(features) > MAX_MAP_ENTRIES:
        return Problem(where, "too_long", f"{len(features)} entries; at most {MAX_MAP_ENTRIES}")
    return _first(
        p
        for i, f in enumerate(features)
        for p in (
            _text(f"{where}[{i}].name", f.name, MAX_KEY_CHARS, required=True),
            _text(f"{where}[{i}].detail", f.detail),
        )
    )


def check_capture(where: str, c: tpb.CaptureStatus) -> Problem | None:
    return _first(
        (
            _text(f"{where}.bpf_unavailable_reason", c.bpf_unavailable_reason),
            _keys(f"{where}.dropped_events", c.dropped_events),
            _counter(f"{where}.telemetry_batches_dropped", c.telemetry_batches_dropped),
            _features(f"{where}.features", c.features),
        )
    )


# Every scalar of a sample, by its path in the sample: one C call reads them all (operator.attrgetter), so
# a good sample costs a few microseconds; only a bad one is looked at field by field.
SAMPLE_COUNTERS: tuple[str, ...] = (
    "syscalls.total",
    *(
        f"block_io.{n}"
        for n in ("read_ops", "write_ops", "read_bytes", "write_bytes", "discard_ops", "discard_bytes")
    ),
    *(f"tcp.{n}" for n in ("retransmits", "active_opens", "resets_sent", "resets_received")),
    *(
        f"resources.{n}"
        for n in (
            "memory_bytes",
            "memory_limit_bytes",
            "io_read_bytes",
            "io_write_bytes",
            "cpu_throttled_us",
            "limits_reapplied",
        )
    ),
    *(f"resources.{p}.{n}" for p in PRESSURES for n in ("some_stall_us", "full_stall_us")),
)
SAMPLE_REALS: tuple[tuple[str, float], ...] = (  # (path, highest valid value)
    ("resources.cpu_limit_cores", MAX_CORES),
    *((f"resources.{p}.{n}", 100.0) for p in PRESSURES for n in ("some_avg10", "full_avg10")),
)
SAMPLE_HISTOGRAMS: tuple[str, ...] = ("syscalls.latency", "block_io.latency", "tcp.srtt")
SAMPLE_MAPS: tuple[str, ...] = ("syscalls.by_name", "tcp.state_changes")
_counters = attrgetter(*SAMPLE_COUNTERS)
_reals = attrgetter(*(path for path, _ in SAMPLE_REALS))
_histograms = attrgetter(*SAMPLE_HISTOGRAMS)
_maps = attrgetter(*SAMPLE_MAPS)


def check_sample(where: str, s: tpb.WorkloadSample, workloads: frozenset[str], now_ms: int) -> Problem | None:
    if s.workload not in workloads:
        return Problem(
            f"{where}.workload",
            "unknown_workload",
            f"{s.workload[:80]!r} is not one of the workloads this agent announced in its hello",
        )
    if s.start_unix_ms <= 0 or s.end_unix_ms <= s.start_unix_ms:
        return Problem(
            f"{where}.end_unix_ms",
            "bad_interval",
            f"interval [{s.start_unix_ms}, {s.end_unix_ms}) is empty or negative",
        )
    if s.end_unix_ms - s.start_unix_ms > MAX_SAMPLE_MS:
        return Problem(f"{where}.end_unix_ms", "too_large", "the sample covers more than a day")
    p = (
        _time(f"{where}.end_unix_ms", s.end_unix_ms, now_ms)
        or _text(f"{where}.cgroup", s.cgroup, MAX_PATH_CHARS)
        or _text(f"{where}.resources.limits_problem", s.resources.limits_problem)
    )
    if p:
        return p
    counters = _counters(s)
    if max(counters) > MAX_COUNTER:
        return _first(_counter(f"{where}.{n}", v) for n, v in zip(SAMPLE_COUNTERS, counters, strict=True))
    seconds = (s.end_unix_ms - s.start_unix_ms) / 1000
    p = _real(f"{where}.resources.cpu_seconds", s.resources.cpu_seconds, seconds * MAX_CORES)
    if p:
        return p
    reals = _reals(s)
    if not all(0.0 <= v <= high for v, (_, high) in zip(reals, SAMPLE_REALS, strict=True)):
        return _first(
            _real(f"{where}.{path}", v, high) for v, (path, high) in zip(reals, SAMPLE_REALS, strict=True)
        )
    p = _first(_histogram(f"{where}.{n}", h) for n, h in zip(SAMPLE_HISTOGRAMS, _histograms(s), strict=True))
    p = p or _first(_keys(f"{where}.{n}", m) for n, m in zip(SAMPLE_MAPS, _maps(s), strict=True))
    if p:
        return p
    # What the store computes from the sample must be storable too (a REAL column refuses NaN).
    if not all(math.isfinite(v) for v in series_values(s)):
        return Problem(where, "not_finite", "a stored series of this sample is not a finite number")
    return None


# ---- messages ----


def check_hello(hello: apb.Hello, fleet: Fleet, now_ms: int) -> Problem | None:
    """The first message of a stream: who the agent is and what it runs."""
    p = _name("hello.host", hello.host)
    if p:
        p = Problem(p.field, p.code, p.detail + ": set `host` in the agent's config")
        return p
    if fleet.hosts and hello.host not in fleet.hosts:
        return Problem(
            "hello.host",
            "unknown_host",
            f"host {hello.host!r} is not in the controller's [[host]] list: add it there",
        )
    if len(hello.workloads) > MAX_WORKLOADS:
        return Problem(
            "hello.workloads", "too_long", f"{len(hello.workloads)} workloads; at most {MAX_WORKLOADS}"
        )
    names = [w.name for w in hello.workloads]
    if len(set(names)) != len(names):
        return Problem("hello.workloads", "duplicate", "duplicate workload names")
    for i, w in enumerate(hello.workloads):
        where = f"hello.workloads[{i}]"
        p = _first(
            (
                _name(f"{where}.name", w.name),
                _text(f"{where}.cgroup", w.cgroup, MAX_PATH_CHARS, required=True),
                None
                if w.cgroup.startswith("/")
                else Problem(f"{where}.cgroup", "bad_value", "must be an absolute cgroup path"),
                None
                if w.role in tpb.Role.values()
                else Problem(f"{where}.role", "bad_value", f"unknown role {w.role}"),
                _name(f"{where}.service", w.service) if w.service else None,
            )
        )
        if p:
            return p
    return _first(
        (
            _text("hello.instance_id", hello.instance_id, MAX_ID_CHARS, required=True),
            _text("hello.agent_version", hello.agent_version, MAX_SHORT_CHARS),
            check_capture("hello.capture", hello.capture),
            _counter("hello.host_info.memory_bytes", hello.host_info.memory_bytes),
            _text("hello.host_info.zone", hello.host_info.zone, MAX_SHORT_CHARS),
            _text("hello.host_info.kernel", hello.host_info.kernel, MAX_SHORT_CHARS),
            _text("hello.peer_address", hello.peer_address, MAX_SHORT_CHARS),
        )
    )


def check_batch(hello: apb.Hello, batch: apb.TelemetryBatch, now_ms: int) -> Problem | None:
    if batch.seq == 0:
        return Problem("seq", "missing", "must be >= 1")
    p = _counter("seq", batch.seq)
    if p:
        return p
    if len(batch.samples) > MAX_SAMPLES_PER_BATCH:
        return Problem(
            "samples", "too_long", f"{len(batch.samples)} samples; at most {MAX_SAMPLES_PER_BATCH} per batch"
        )
    known = frozenset(w.name for w in hello.workloads)
    return _first(
        (
            *(check_sample(f"samples[{i}]", s, known, now_ms) for i, s in enumerate(batch.samples)),
            check_capture("capture", batch.capture),
        )
    )


def _service(where: str, service: str, fleet: Fleet) -> tuple[ServiceRoles | None, Problem | None]:
    roles = fleet.services.get(service)
    if roles is None:
        return None, Problem(
            where, "unknown_service", f"{service[:80]!r} is not a [[service]] of the controller"
        )
    return roles, None


def check_observation(o: apb.Observation, observer: str, fleet: Fleet, now_ms: int) -> Problem | None:
    roles, p = _service("observation.service", o.service, fleet)
    if roles is None:
        return p
    if o.kind not in OBSERVATION_KINDS:
        return Problem("observation.kind", "bad_value", f"{o.kind[:80]!r} is none of {OBSERVATION_KINDS}")
    if observer not in roles.observers and not (o.kind != "health" and observer in roles.witnesses):
        return Problem("observation.service", "not_observer", f"{observer} is no observer of {o.service}")
    if o.kind == "health" and o.target not in roles.targets:
        return Problem(
            "observation.target",
            "unknown_host",
            f"{o.target[:80]!r} is neither primary nor shadow of {o.service}",
        )
    # A lease's holder is whoever the observer last granted, even one that should not be (a rogue renewal):
    # it must reach the board, which then stops counting that observer for the real owner.
    p = _name("observation.target", o.target) if o.kind == "lease" else None
    if p:
        return p
    return _first(
        (
            _text("observation.detail", o.detail),
            _time("observation.since_unix_ms", o.since_unix_ms, now_ms, required=False),
            _counter("observation.token", o.token),
        )
    )


def check_lease_event(e: apb.LeaseEvent, host: str, fleet: Fleet, now_ms: int) -> Problem | None:
    roles, p = _service("lease_event.service", e.service, fleet)
    if roles is None:
        return p
    if host not in roles.targets:
        return Problem(
            "lease_event.service", "not_in_service", f"{host} is neither primary nor shadow of {e.service}"
        )
    if e.what not in LEASE_EVENTS:
        return Problem("lease_event.what", "bad_value", f"{e.what[:80]!r} is none of {LEASE_EVENTS}")
    return _first(
        (
            _counter("lease_event.token", e.token),
            _text("lease_event.reason", e.reason),
            _time("lease_event.unix_ms", e.unix_ms, now_ms),
        )
    )


def check_result(r: apb.CommandResult) -> Problem | None:
    """A result's own values; `check_answer` checks it against its command."""
    p = _first(
        (
            _text("result.command_id", r.command_id, MAX_ID_CHARS, required=True),
            _text("result.incarnation", r.incarnation, MAX_ID_CHARS),
            _text("result.error", r.error),
            None if r.ok or r.error else Problem("result.error", "missing", "a failed command must say why"),
        )
    )
    if p:
        return p
    detail = r.WhichOneof("detail")
    if detail == "vote":
        return _counter("result.vote.promised_token", r.vote.promised_token)
    if detail == "hook":
        return _first(
            (
                _text("result.hook.phase", r.hook.phase, MAX_SHORT_CHARS),
                _text("result.hook.output_tail", r.hook.output_tail, MAX_OUTPUT_TAIL_CHARS),
            )
        )
    if detail == "address":
        return _first(
            (
                _text("result.address.service", r.address.service),
                _counter("result.address.token", r.address.token),
            )
        )
    if detail == "limits":
        li = r.limits
        return _first(
            (
                _text("result.limits.workload", li.workload, MAX_SHORT_CHARS),
                _real("result.limits.cpu_cores", li.cpu_cores, MAX_CORES),
                _counter("result.limits.memory_bytes", li.memory_bytes),
                _counter("result.limits.memory_in_use_bytes", li.memory_in_use_bytes),
            )
        )
    return None


def check_answer(cmd: apb.Command, r: apb.CommandResult) -> Problem | None:
    """Does `r` answer `cmd`? Its detail must be the one the command's kind returns, about the same thing."""
    kind = cmd.WhichOneof("action") or ""
    want = ANSWERS.get(kind)
    got = r.WhichOneof("detail")
    if got is not None and got != want:
        return Problem(
            f"result.{got}",
            "wrong_answer",
            f"a {kind} command is answered with {want or 'no detail'}, not {got} (command {cmd.command_id})",
        )
    if got is None:
        if want is not None and (r.ok or kind in ANSWERED_EVEN_IF_FAILED):
            said = f" (it said: {r.error[:200]})" if r.error else ""
            return Problem(f"result.{want}", "wrong_answer", f"a {kind} command must return its {want}{said}")
        return None
    if kind == "vote" and r.vote.granted and r.vote.promised_token != cmd.vote.token:
        return Problem(
            "result.vote.promised_token",
            "wrong_answer",
            f"the vote was granted for token {r.vote.promised_token}, but asked for {cmd.vote.token}",
        )
    if kind in ("acquire", "release"):
        asked = cmd.acquire if kind == "acquire" else cmd.release
        if r.address.service != asked.service:
            return Problem(
                "result.address.service",
                "wrong_answer",
                f"answers for service {r.address.service[:80]!r}, the command was for {asked.service!r}",
            )
        if asked.token and r.address.token != asked.token:
            return Problem(
                "result.address.token",
                "wrong_answer",
                f"answers for token {r.address.token}, the command was for {asked.token}",
            )
    if kind == "run_hook" and r.hook.phase != cmd.run_hook.phase:
        return Problem(
            "result.hook.phase",
            "wrong_answer",
            f"answers hook {r.hook.phase[:80]!r}, not {cmd.run_hook.phase!r}",
        )
    if kind == "set_limits" and r.limits.workload != cmd.set_limits.workload:
        return Problem(
            "result.limits.workload",
            "wrong_answer",
            f"answers for workload {r.limits.workload[:80]!r}, not {cmd.set_limits.workload!r}",
        )
    return None


def check_message(
    msg: apb.AgentMessage, hello: apb.Hello, fleet: Fleet, now_ms: int
) -> tuple[str, Problem | None]:
    """(the message's kind, its problem or None) for every message after the hello."""
    kind = msg.WhichOneof("body")
    if kind is None:
        return "none", Problem("body", "missing", "no message body: is this agent newer than the controller?")
    if kind == "telemetry":
        return kind, check_batch(hello, msg.telemetry, now_ms)
    if kind == "heartbeat":
        return kind, _time("heartbeat.unix_ms", msg.heartbeat.unix_ms, now_ms)
    if kind == "result":
        return kind, check_result(msg.result)
    if kind == "observation":
        return kind, check_observation(msg.observation, hello.host, fleet, now_ms)
    if kind == "lease_event":
        return kind, check_lease_event(msg.lease_event, hello.host, fleet, now_ms)
    if kind == "hello":
        return kind, Problem("hello", "unexpected", "hello is only valid as the first message of a stream")
    return kind, Problem("body", "bad_value", f"unknown message {kind!r}")
