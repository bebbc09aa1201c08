"""Real lease observers on loopback for the owner-side tests: each an ObserverRole behind a real gRPC Lease
server, past its start-up grace, that voted `token` for p1 on service web. Imported by the tests and by
the scenarios they run in a network namespace (with the checkout as their working directory)."""

from __future__ import annotations

import grpc

from agentd.failover import ObserverRole
from shadowplane.lease_observer import LeaseServicer
from shadowplane.v1 import agent_pb2 as apb
from shadowplane.v1 import lease_pb2_grpc as lgrpc


async def serve_observers(
    n: int, lease_ms: int, token: int = 1
) -> tuple[list[ObserverRole], list[grpc.aio.Server], list[str]]:
    """The roles, their started servers (the caller stops them) and their addresses."""
    roles, servers, addrs = [], [], []
    for i in range(n):
        role = ObserverRole(f"o{i}", report=lambda m: None)
        role.leases.started_at -= 10  # past the start-up grace
        role.leases.observe(["web"], lease_ms / 1000)
        assert role.vote(apb.Vote(service="web", token=token, candidate="p1")).granted
        server = grpc.aio.server()
        lgrpc.add_LeaseServicer_to_server(LeaseServicer(role.leases), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        roles.append(role)
        servers.append(server)
        addrs.append(f"127.0.0.1:{port}")
    return roles, servers, addrs
