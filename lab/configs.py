"""The lab's configuration files, as text, from its plan: pure functions, so tests can load them with the
daemons' own loaders without building anything; and the lab's certificates (`issue_certificates`, which
writes them: every lab runs with mutual TLS unless its spec says `plaintext`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.spec import CONTROLLER_PORT, DNS_ZONE, PEER_PORT, Plan, ServicePlan
from shadowplane import pki

Value = str | int | float | bool | Sequence[str]

CONTROLLER_CERT_NAME = "controller"  # the controller's certificate (role controller, its address as a SAN)
OPERATOR_CERT_NAME = "lab"  # the lab's own Fleet calls (status, chaos, tests) as an operator


@dataclass(frozen=True)
class Credentials:
    """One party's files, as a daemon's [tls] section names them."""

    ca: Path
    cert: Path
    key: Path

    def toml(self) -> dict[str, Value | Path]:
        return {"ca": self.ca, "cert": self.cert, "key": self.key}


def tls_dir(workdir: Path) -> Path:
    return workdir / "tls"


def credentials(workdir: Path, role: pki.Role, name: str) -> Credentials:
    """Where `issue_certificates` puts `name`'s files (the names `shadowplane.pki.issue` gives them)."""
    d = tls_dir(workdir)
    return Credentials(d / "ca.pem", d / f"{role}-{name}.pem", d / f"{role}-{name}.key")


def issue_certificates(plan: Plan, workdir: Path) -> None:
    """A fresh fleet CA for this lab and every party's certificate, made with the same code as
    `shadowctl certs` (shadowplane/pki.py): the controller (its address as a SAN), one agent certificate
    per fleet host named as the host, and an operator certificate for the lab's own calls. The lab then
    runs in the security mode production runs in (mutual TLS), so every lab test exercises it."""
    d = tls_dir(workdir)
    pki.init_ca(d, name="Shadowplane lab CA", days=30)
    for h in plan.controller_hosts():
        pki.issue(d, controller_cert_name(h.name), "controller", sans=(h.ipv4,), days=30)
    for h in plan.fleet_hosts():
        pki.issue(d, h.name, "agent", sans=(h.ipv4, h.ipv6), days=30)
    pki.issue(d, OPERATOR_CERT_NAME, "operator", days=30)


def controller_cert_name(host: str) -> str:
    """The first controller's certificate keeps its name; each further replica's is named as its host."""
    return CONTROLLER_CERT_NAME if host == "ctl" else host


def controller_process(host: str) -> str:
    """The lab's name of the controller process in `host` ("controller", "controller-ctl2", ...)."""
    return "controller" if host == "ctl" else f"controller-{host}"


def tls_table(plan: Plan, workdir: Path, role: pki.Role, name: str) -> str:
    if plan.spec.plaintext:
        return toml_table("[tls]", {"plaintext": True})
    return toml_table("[tls]", credentials(workdir, role, name).toml())


def toml_value(v: Value | Path) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))  # a JSON string of printable text is a valid TOML basic string
    return "[" + ", ".join(json.dumps(x) for x in v) + "]"


def toml_table(header: str, values: Mapping[str, Value | Path]) -> str:
    lines = [header] if header else []
    lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def controller_toml(
    plan: Plan, workdir: Path, tsig_secret: str = "", host: str = "ctl", etcd: Sequence[str] = ()
) -> str:
    """The controller's config, or replica `host`'s (with `etcd`, the members' URLs: its [cluster] table;
    its etcd CA and client certificate are its own [tls] files: the lab's CA signs the members' too)."""
    t, h = plan.spec.timings, plan.host(host)
    out = [
        "# Written by `python -m lab up`; rewritten each time the lab comes up.\n",
        toml_table("", {"listen": f"{h.ipv4}:{CONTROLLER_PORT}"}),
        tls_table(plan, workdir, "controller", controller_cert_name(host)),
        toml_table("[metrics]", {"listen": f"{h.ipv4}:{METRICS_PORT}"}),
        toml_table(
            "[store]", {"path": workdir / ("controller.db" if host == "ctl" else f"controller-{host}.db")}
        ),
        toml_table(
            "[failover]",
            {
                "lease_seconds": t.lease_seconds,
                "renew_interval_seconds": t.renew_interval_seconds,
                "heartbeat_timeout_seconds": t.heartbeat_timeout_seconds,
                "loop_interval_seconds": t.loop_interval_seconds,
                "placement_grace_seconds": t.placement_grace_seconds,
            },
        ),
        toml_table(
            "[scaling]",
            {
                "interval_seconds": t.scaling_interval_seconds,
                # a lab forecast step lasts one scaling interval: time compressed, the model sees its steps
                "forecast_step_seconds": t.scaling_interval_seconds,
                "lower_hold_seconds": t.scaling_lower_hold_seconds,
                "max_changes_per_day": t.scaling_max_changes_per_day,
                "cpu_floor_cores": 0.1,
            },
        ),
    ]
    if etcd:
        shards = {"shards": plan.spec.shards} if plan.spec.shards > 1 else {}
        out.append(toml_table("[cluster]", {"name": host, "etcd": list(etcd), **shards}))
    for fh in plan.fleet_hosts():
        out.append(toml_table("[[host]]", {"name": fh.name, "zone": fh.zone, "address": fh.ipv4}))
    for s in plan.services:
        out.append(_service(plan, s, tsig_secret))
    return "\n".join(out)


def _service(plan: Plan, s: ServicePlan, tsig_secret: str) -> str:
    spec, t = plan.spec, plan.spec.timings
    text = toml_table(
        "[[service]]",
        {
            "name": s.name,
            "primary": s.primary,
            "shadows": list(s.shadows),
            "vip": s.vip,
            "garp_count": t.garp_count,
            "garp_interval_seconds": t.garp_interval_seconds,
            "failback": spec.failback,
            "failback_hold_seconds": t.failback_hold_seconds,
            "flap_window_seconds": t.flap_window_seconds,
            "hook_timeout_seconds": t.hook_timeout_seconds,
            "hook_failure": spec.hook_failure,
            **({"observers": list(spec.observers)} if spec.observers else {}),
        },
    )
    text += toml_table(
        "[service.health]",
        {
            "kind": "http",
            "port": spec.http_port,
            "interval_seconds": t.health_interval_seconds,
            "timeout_seconds": t.health_timeout_seconds,
            "fall": t.health_fall,
            "rise": t.health_rise,
        },
    )
    if spec.dns:
        text += toml_table(
            "[service.dns]",
            {
                "server": f"{plan.host('dns').ipv4}:53",
                "zone": DNS_ZONE,
                "name": s.dns_name,
                "ttl": 5,
                "tsig_name": TSIG_NAME,
                "tsig_secret": tsig_secret,
            },
        )
    return text


TSIG_NAME = "splab-key."
METRICS_PORT = 9464  # each host's /metrics, inside its own namespace


def agent_toml(plan: Plan, host: str, workdir: Path) -> str:
    h, t = plan.host(host), plan.spec.timings
    out = [
        "# Written by `python -m lab up`.\n",
        toml_table(
            "",
            {
                "controller": plan.controller_address,
                **({"controllers": plan.controller_addresses} if plan.spec.controllers > 1 else {}),
                "host": h.name,
                "zone": h.zone,
                "interval_seconds": t.agent_interval_seconds,
                "heartbeat_interval_seconds": t.agent_heartbeat_interval_seconds,
                "reconnect_max_seconds": t.agent_reconnect_max_seconds,
                "peer_listen": f"{h.ipv4}:{PEER_PORT}",
                "hooks_dir": hooks_dir(workdir, h.name),
                # what a restarted agent resumes (systemd's /run/shadowplane-agentd is one per host)
                "lease_state_file": workdir / "agent-state" / h.name / "leases.json",
            },
        ),
        tls_table(plan, workdir, "agent", h.name),
        toml_table("[metrics]", {"listen": f"{h.ipv4}:{METRICS_PORT}"}),
        toml_table("[capture]", {"bpf": plan.spec.agent_bpf, "create_cgroups": True}),
    ]
    for s, role in plan.workloads(host):
        out.append(
            toml_table(
                "[[workload]]",
                {
                    "name": s.name,
                    "cgroup": s.cgroup(host),
                    "role": role,
                    "service": s.name,
                    "interface": "eth0",
                },
            )
        )
    return "\n".join(out)


def hooks_dir(workdir: Path, host: str) -> Path:
    return workdir / "hooks" / host


def keepalived_conf(
    plan: Plan, host: str, advert_int: float, priorities: Mapping[str, int] | None = None
) -> str:
    """A keepalived (VRRPv3) configuration for one lab host: one instance per service it serves, the
    primary at priority 150 and the shadows at 100, 90, ... unless `priorities` says otherwise."""
    lines = [
        "# Written by the lab for comparison runs; VRRPv3 multicast on the lab bridge.",
        "global_defs {",
        f"  router_id {plan.host(host).namespace}",
        "  vrrp_version 3",
        "  enable_script_security",
        "}",
    ]
    for s, role in plan.workloads(host):
        prio = (priorities or {}).get(host)
        if prio is None:
            prio = 150 if role == "primary" else 100 - 10 * s.shadows.index(host)
        vrid = 50 + plan.services.index(s) + 1
        lines += [
            f"vrrp_instance {s.name} {{",
            f"  state {'MASTER' if role == 'primary' else 'BACKUP'}",
            "  interface eth0",
            f"  virtual_router_id {vrid}",
            f"  priority {prio}",
            f"  advert_int {advert_int:g}",
            "  virtual_ipaddress {",
            f"    {s.vip} dev eth0",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"
