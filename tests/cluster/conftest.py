"""A real 3-member etcd cluster (Debian's etcd-server, mutual TLS, on loopback) for each test module."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from lab.etcd import EtcdCluster
from tests.support import need


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    need(shutil.which("etcd"), "etcd missing", "apt-get install etcd-server (make setup installs it)")
    cluster = EtcdCluster.start(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster
    finally:
        cluster.down()
