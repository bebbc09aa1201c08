"""The DCS (`controller/cluster/dcs.py`) over etcd v3, through its gRPC gateway (JSON over HTTPS) with
`etcd3gw`: a maintained client that needs neither etcd's generated protobuf code (the classic `etcd3`
package does not import with protobuf >= 4) nor a gRPC channel of its own beside ours. (`aetcd`, the
asyncio client, opens only plaintext channels: no TLS.)

Every endpoint of the cluster is tried in turn: a member that is down or cut off costs one request timeout,
not an outage, and the next call starts at the member that answered last.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw import exceptions as etcd_errors
from etcd3gw.client import Etcd3Client

from controller.cluster.dcs import DcsUnavailable, Versioned

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True)
class EtcdTls:
    ca: str  # the CA that signed the etcd members' certificates
    cert: str = ""  # this client's certificate and key (etcd with --client-cert-auth wants them)
    key: str = ""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _prefix_end(prefix: str) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's range_end for a prefix)."""
    b = bytearray(prefix.encode())
    b[-1] += 1
    return bytes(b)


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """("https", host, port) of "https://host:port"; ValueError naming what is wrong."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or u.port is None:
        raise ValueError(f"{url!r}: an etcd endpoint is https://HOST:PORT (or http:// when asked for)")
    return u.scheme, u.hostname, u.port


@dataclass(frozen=True)
class EtcdStatus:
    leader_name: str  # the etcd member that leads its Raft group ("" none)
    members: tuple[str, ...]  # every member's name


class EtcdDcs:
    def __init__(
        self,
        endpoints: Sequence[str],
        tls: EtcdTls | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoint")
        self.endpoints = list(endpoints)
        self._clients: list[Etcd3Client] = []
        for url in self.endpoints:
            scheme, host, port = parse_endpoint(url)
            if scheme == "https" and tls is None:
                raise ValueError(f"{url}: https needs the CA (and client certificate) of the etcd cluster")
            # Our own session: with the environment trusted, requests lets REQUESTS_CA_BUNDLE override the
            # cluster's CA and routes through any HTTPS_PROXY. etcd is reached directly, with its own CA.
            session = requests.Session()
            session.trust_env = False
            if tls is not None:
                session.verify = tls.ca
                if tls.cert and tls.key:
                    session.cert = (tls.cert, tls.key)
            self._clients.append(
                Etcd3Client(
                    host=host,
                    port=port,
                    protocol=scheme,
                    timeout=timeout,
                    api_path="/v3/",  # etcd >= 3.4: no discovery round trip
                    session=session,
                )
            )
        self._current = 0

    def _call(self, what: str, fn: Callable[[Etcd3Client], T]) -> T:
        errors = []
        for i in range(len(self._clients)):
            k = (self._current + i) % len(self._clients)
            try:
                out = fn(self._clients[k])
            except (
                etcd_errors.ConnectionFailedError,
                etcd_errors.ConnectionTimeoutError,
                etcd_errors.InternalServerError,
            ) as e:
                # down, cut off, or without a quorum ("etcdserver: request timed out"): the next member
                errors.append(f"{self.endpoints[k]}: {type(e).__name__}")
                continue
            self._current = k
            return out
        raise DcsUnavailable(f"etcd {what}: no member answered ({'; '.join(errors)})")

    def _post(self, what: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        def one(c: Etcd3Client) -> dict[str, Any]:
            out: dict[str, Any] = c.post(c.get_url(path), json=body)
            return out

        return self._call(what, one)

    def grant(self, ttl_seconds: int) -> int:
        return int(self._post("lease grant", "/lease/grant", {"TTL": ttl_seconds, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> bool:
        out = self._post("lease keepalive", "/lease/keepalive", {"ID": lease})
        # an expired lease comes back without a TTL (proto3 JSON leaves zero fields out)
        return int(out.get("result", {}).get("TTL", 0)) > 0

    def revoke(self, lease: int) -> None:
        try:
            self._post("lease revoke", "/lease/revoke", {"ID": lease})
        except etcd_errors.Etcd3Exception as e:
            if "not found" not in str(e).lower():  # expired already: as good as revoked
                raise

    def get(self, key: str) -> Versioned | None:
        out = self._post("get", "/kv/range", {"key": _b64(key)})
        kvs = out.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return Versioned(base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))

    def _txn(self, what: str, key: str, compare: dict[str, Any], value: bytes, lease: int) -> int:
        """The put's revision if the comparison held, else 0."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = lease
        body = {
            "compare": [{"key": _b64(key), "result": "EQUAL", **compare}],
            "success": [{"request_put": put}],
        }
        out = self._post(what, "/kv/txn", body)
        return int(out.get("header", {}).get("revision", 0)) if out.get("succeeded", False) else 0

    def create(self, key: str, value: bytes, lease: int = 0) -> bool:
        return self._txn("create", key, {"target": "CREATE", "create_revision": 0}, value, lease) > 0

    def cas(self, key: str, value: bytes, revision: int) -> int:
        if revision == 0:
            return self._txn("create", key, {"target": "CREATE", "create_revision": 0}, value, 0)
        return self._txn("compare-and-set", key, {"target": "MOD", "mod_revision": revision}, value, 0)

    def put(self, key: str, value: bytes) -> int:
        out = self._post("put", "/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(out.get("header", {}).get("revision", 0))

    def scan(self, prefix: str, min_revision: int = 0, limit: int = 0) -> list[tuple[str, Versioned]]:
        body: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(_prefix_end(prefix)),
            "sort_order": "ASCEND",
            "sort_target": "MOD",
        }
        if min_revision:
            body["min_mod_revision"] = min_revision
        if limit:
            body["limit"] = limit
        kvs = self._post("range", "/kv/range", body).get("kvs") or []
        return [
            (
                base64.b64decode(kv["key"]).decode(),
                Versioned(base64.b64decode(kv.get("value", "")), int(kv["mod_revision"])),
            )
            for kv in kvs
        ]

    def delete_below(self, prefix: str, end: str) -> None:
        self._post("delete", "/kv/deleterange", {"key": _b64(prefix), "range_end": _b64(prefix + end)})

    def status(self) -> EtcdStatus:
        """Who leads the etcd cluster and who is in it (for status views and tests)."""
        st = self._post("status", "/maintenance/status", {})
        members = self._post("member list", "/cluster/member/list", {}).get("members", [])
        names = {str(m.get("ID")): str(m.get("name", "")) for m in members}
        return EtcdStatus(names.get(str(st.get("leader")), ""), tuple(sorted(names.values())))
