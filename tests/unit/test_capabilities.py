"""The agent keeps only its four capabilities once the capture's build child is started
(agentd/capabilities.py): every set of the daemon, bounding set included, holds exactly what
$SHADOWPLANE_KEEP_CAPABILITIES names.
Each case runs in a child process of its own, since dropping is for good."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agentd.capabilities import CAP_NAMES, CapabilityError, parse_keep
from tests.support import need_root

FOUR = "CAP_BPF CAP_PERFMON CAP_NET_ADMIN CAP_NET_RAW"


def child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_names_are_parsed_and_an_unknown_one_is_named() -> None:
    assert parse_keep("CAP_BPF, cap_net_raw") == {CAP_NAMES["CAP_BPF"], CAP_NAMES["CAP_NET_RAW"]}
    with pytest.raises(CapabilityError, match="CAP_NET_ADMN"):
        parse_keep("CAP_BPF CAP_NET_ADMN")


def test_every_set_keeps_exactly_the_named_capabilities() -> None:
    need_root()
    r = child(
        "from agentd.capabilities import keep_only, parse_keep\n"
        f"dropped = keep_only(parse_keep({FOUR!r}))\n"
        "print('dropped', ' '.join(dropped))\n"
        "print(open('/proc/self/status').read())\n"
    )
    assert r.returncode == 0, r.stderr
    caps = {
        k: int(v, 16)
        for k, v in (line.split(":\t") for line in r.stdout.splitlines() if line.startswith("Cap"))
    }
    want = sum(1 << CAP_NAMES[n] for n in FOUR.split())
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == want, {k: hex(v) for k, v in caps.items()}
    assert caps["CapInh"] == 0 and caps["CapAmb"] == 0
    assert "CAP_SYS_ADMIN" in r.stdout.splitlines()[0]
    # and nothing it starts gets them back (root execs get the bounding set)
    r = child(
        "import subprocess\nfrom agentd.capabilities import keep_only, parse_keep\n"
        f"keep_only(parse_keep({FOUR!r}))\n"
        "p = subprocess.run(['grep', 'CapEff', '/proc/self/status'], capture_output=True, text=True)\n"
        "print(p.stdout)\n"
    )
    assert int(r.stdout.split()[1], 16) == want, r.stdout


def test_it_refuses_once_threads_run() -> None:
    """Capabilities are per thread: dropping them in one would leave the others privileged."""
    need_root()
    r = child(
        "import threading, time\nfrom agentd.capabilities import CapabilityError, keep_only, parse_keep\n"
        "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "try:\n    keep_only(parse_keep('CAP_BPF'))\nexcept CapabilityError as e:\n    print(e)\n"
        "print(open('/proc/self/status').read())\n"
    )
    assert "cannot drop capabilities with 2 threads running" in r.stdout, r.stdout + r.stderr
    eff = next(line for line in r.stdout.splitlines() if line.startswith("CapEff"))
    assert int(eff.split()[1], 16) & (1 << CAP_NAMES["CAP_SYS_ADMIN"]), "nothing was dropped"


def test_the_agent_has_one_thread_when_it_drops() -> None:
    """Importing the agent must start no thread (numpy would start OpenBLAS's pool: agentd/__init__.py)."""
    r = child("import os\nimport agentd.cli\nprint(len(os.listdir('/proc/self/task')))")
    assert r.stdout.strip() == "1", r.stdout + r.stderr
