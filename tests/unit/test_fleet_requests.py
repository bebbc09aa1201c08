"""The Fleet API's one check of what callers send (`fleet_messages.request_problem`): what shadowctl and the
lab send passes; anything else is named by its field, with what it must be and the value, never whole."""

from __future__ import annotations

import math

from controller.fleet_messages import request_problem
from shadowplane.v1 import fleet_pb2 as fpb


def test_what_shadowctl_and_the_lab_send_passes() -> None:
    for request in [
        fpb.ListHostsRequest(),
        fpb.GetTelemetryRequest(host="web-1", limit=1),
        fpb.GetTelemetryRequest(host="web-1", workload="web", since_unix_ms=-1, limit=10_000),
        fpb.GetTelemetryRequest(host="web-1", cgroup="/shadowplane.slice/web"),
        fpb.ListServicesRequest(),
        fpb.FailoverRequest(service="web", to="s1.example", force=True),
        fpb.FailbackRequest(service="web"),
        fpb.ListEventsRequest(service="web", after_id=2**63 - 1, limit=50_000),  # the limit is clamped
        fpb.GetPlanRequest(workload="s1/web", last=5),
        fpb.GetPlanRequest(workload="web"),
        fpb.Override(
            host="s1", workload="web", kind="pin", cpu_cores=1.5, reason="load test: twice the traffic"
        ),
        fpb.Override(host="s1", workload="web", kind="clear", by="\x00 ignored", unix_ms=-5),
    ]:
        assert request_problem(request) is None, request


def test_a_bad_field_is_named_with_what_it_must_be() -> None:
    cases = [
        (fpb.GetTelemetryRequest(), "host: is required (see ListHosts for names), got ''"),
        (fpb.GetTelemetryRequest(host="h", limit=10_001), "limit: must be at most 10000, got 10001"),
        (fpb.GetTelemetryRequest(host="h", cgroup="web"), "cgroup: must be a cgroup path starting with '/'"),
        (fpb.ListEventsRequest(after_id=2**63), "after_id: must be at most 2^63-1"),
        (fpb.ListServicesRequest(service="a b"), "service: must be a name of 1-63 letters"),
        (fpb.FailbackRequest(), "service: is required (see shadowctl services)"),
        (fpb.GetPlanRequest(workload="a/b/c"), "workload: must be HOST/WORKLOAD or a service name"),
        (fpb.Override(host="s1", workload="web", cpu_max=math.nan), "cpu_max: must be a finite number"),
        (
            fpb.Override(host="s1", workload="web", cpu_min=-0.5),
            "cpu_min: must be a finite number, 0 or more",
        ),
        (fpb.Override(host="s1", workload="web", memory_max=2**64 - 1), "memory_max: must be at most 2^63-1"),
        (fpb.Override(host="s1", workload="web", reason="a\nb"), "reason: must be printable text"),
    ]
    for request, problem in cases:
        assert (request_problem(request) or "").startswith(problem), request


def test_a_huge_value_is_quoted_short() -> None:
    problem = request_problem(fpb.FailbackRequest(service="x" * 1000)) or ""
    assert problem.startswith("service: must be a name") and len(problem) < 200
    assert problem.endswith("... (1000 characters)")
    problem = request_problem(fpb.Override(host="s1", workload="web", reason="x" * 100_000)) or ""
    assert problem.startswith("reason: must be at most 4096 characters") and len(problem) < 200


def test_repeated_map_and_nested_fields_are_checked_too() -> None:
    """No request has one today; a field added later is checked without new code."""
    nested = fpb.GetPlanResponse(shadows=[fpb.ShadowState(host="ok"), fpb.ShadowState(cpu_cores=math.inf)])
    assert (request_problem(nested) or "").startswith("shadows[1].cpu_cores: must be a finite number")
    mapped = fpb.ScalingDecision(forecast={"q0.5": 1.0, "q0.99": math.nan})
    assert (request_problem(mapped) or "").startswith("forecast['q0.99']: must be a finite number")
