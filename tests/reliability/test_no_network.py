"""With W&B offline (the default), a real ``fit`` opens no network connection - in any process.

A tiny ``python -m lightning_mim fit`` runs in a subprocess under two independent observers:

* an audit hook (``sys.addaudithook`` via a ``sitecustomize`` on ``PYTHONPATH``, so every Python
  process of the run gets it) records every ``socket.connect``/``sendto``/``bind`` and
  ``socket.getaddrinfo``;
* ``strace -f`` records the ``connect``/``sendto``/``sendmsg``/``bind`` system calls of the whole
  process tree - including W&B's service, ``wandb-core``, a Go binary no Python hook can see (the
  trace must show it was started).

Allowed: Unix sockets (W&B talks to wandb-core through one), netlink (interface listing) and
loopback addresses. As root, the run also happens in a fresh network namespace that has only
loopback (``unshare -n``), so it proves it needs no network at all: it completes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_probes import REPO, cli_command, subprocess_env

SITECUSTOMIZE = r'''
import ipaddress, json, os, socket, sys

_LOG = os.environ["LMIM_AUDIT_LOG"]

def _external(host):
    try:
        return not ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return str(host) not in ("localhost", "", "None")

def _record(event, detail, external):
    with open(_LOG, "a") as handle:
        handle.write(json.dumps({"pid": os.getpid(), "event": event, "detail": detail, "external": external}) + "\n")

def _hook(event, args):
    if event in ("socket.connect", "socket.sendto", "socket.bind"):
        sock, address = args[0], args[1]
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            _record(event, repr(address), _external(address[0]))
        else:
            _record(event, f"{sock.family.name} {address!r}", False)
    elif event == "socket.getaddrinfo":
        _record(event, repr(args[0]), _external(args[0]))

_record("started", " ".join(sys.orig_argv)[:200], False)
sys.addaudithook(_hook)
'''

SYSCALL = re.compile(r"^(?P<pid>\d+)\s+(?P<call>connect|sendto|sendmsg|bind)\(")
FAMILY = re.compile(r"sa_family=(AF_\w+)")
ADDRESS = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')


def external_syscalls(trace: str) -> list[str]:
    """Traced socket calls that reach beyond Unix sockets, netlink and loopback."""
    found = []
    for line in trace.splitlines():
        if not SYSCALL.match(line):
            continue
        for family in FAMILY.findall(line):
            if family in ("AF_UNIX", "AF_NETLINK", "AF_UNSPEC"):
                continue
            addresses = [a or b for a, b in ADDRESS.findall(line)]
            if family not in ("AF_INET", "AF_INET6") or not addresses or any(
                    not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_unspecified
                    for a in addresses):
                found.append(line)
    return found


def observed(command: list[str], tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str, list[dict]]:
    """Run ``command`` under both observers (in a loopback-only network namespace when root)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace to observe W&B's wandb-core (a Go binary; the Python audit hook cannot see it)")
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    audit_log, trace_log = tmp_path / "audit.jsonl", tmp_path / "strace.log"
    env = {**env, "LMIM_AUDIT_LOG": str(audit_log), "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}
    command = [strace, "-f", "-qq", "--seccomp-bpf", "-e", "trace=execve,connect,sendto,sendmsg,bind",
               "-o", str(trace_log), *command]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):  # nothing but loopback
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    events = [json.loads(line) for line in audit_log.read_text().splitlines()] if audit_log.exists() else []
    return result, trace_log.read_text(), events


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses strace and network namespaces")


def test_the_observers_catch_an_attempted_connection(tmp_path):
    """Positive control: a connection attempt to a public address is seen by both observers."""
    probe = "import socket; s = socket.socket(); s.settimeout(0.2); s.connect_ex(('192.0.2.1', 80))"
    result, trace, events = observed([sys.executable, "-c", probe], tmp_path, subprocess_env())
    assert result.returncode == 0, result.stderr
    assert any("192.0.2.1" in line for line in external_syscalls(trace))
    assert [e for e in events if e["external"] and "192.0.2.1" in e["detail"]]


@pytest.mark.timeout(400)
def test_offline_fit_opens_no_network_connection_in_any_process(tmp_path):
    env = subprocess_env()
    env.pop("WANDB_MODE")  # offline must be the CLI's own default, not the test environment's
    runs = tmp_path / "runs"
    fit = cli_command("fit", "--config", str(REPO / "experiments/mae.yaml"), "--config",
                      str(REPO / "tests/configs/mae_tiny.yaml"), "--trainer.max_epochs", "1",
                      "--trainer.default_root_dir", str(runs), "--trainer.logger.init_args.save_dir", str(runs))

    result, trace, events = observed(fit, tmp_path, env)

    assert result.returncode == 0, result.stderr[-4000:]
    run_id = (runs / "wandb_run_id.txt").read_text().strip()
    assert (runs / "lightning-mim" / run_id / "checkpoints" / "last.ckpt").is_file()
    assert list((runs / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert re.search(r'execve\("[^"]*wandb-core"', trace), "wandb-core did not run under the trace"
    assert not external_syscalls(trace), "\n".join(external_syscalls(trace)[:20])
    assert any(e["event"] == "started" and "lightning_mim fit" in e["detail"] for e in events)
    assert any(e["event"] == "socket.connect" and "AF_UNIX" in e["detail"] for e in events)  # the hook saw W&B's socket
    assert not [e for e in events if e["external"]]
