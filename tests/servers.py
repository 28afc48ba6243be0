"""Real Redis deployments for tests: a cluster, a Sentinel-managed master, TLS, ACL users.

Every server listens on a free port of 127.0.0.1 only. Every process is registered with a
`Processes` as soon as it is started, and `Processes.kill_all` (called from fixtures'
`finally`) SIGKILLs them all, whatever happened in the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import redis

from tests.support import free_port, redis_server_binary, wait_for


class Processes:
    """Every process a fixture started, to be killed at teardown."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, args: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
        log = open(log_path, "ab")  # noqa: SIM115 - kept for the process's life
        process = subprocess.Popen(list(args), stdout=log, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
        for process in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):  # after SIGKILL: not for long
                process.wait(10)


def redis_cli_binary() -> str | None:
    """`redis-cli` next to the redis-server in use, else on PATH; None if there is none."""
    beside = Path(redis_server_binary()).resolve().parent / "redis-cli"
    if beside.exists():
        return str(beside)
    return shutil.which("redis-cli")


def server_version() -> tuple[int, ...]:
    """The redis-server version, from `redis-server --version` (`v=7.0.15`)."""
    out = subprocess.run(
        [redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    found = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def server_supports_tls() -> bool:
    """Whether this redis-server was built with TLS (Debian's is; some wheels are not)."""
    # The config parser stops at the first directive it does not know: with TLS built in,
    # that is the bogus one after `tls-port`.
    probe = subprocess.run(
        [redis_server_binary(), "--port", "0", "--tls-port", "0", "--rqworkers-probe", "1"],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return "tls-port" not in probe.stdout + probe.stderr


class Server:
    """One redis-server (or sentinel) process on 127.0.0.1 with extra arguments."""

    def __init__(
        self,
        processes: Processes,
        workdir: Path,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        tls: bool = False,
        conf: str | None = None,
    ) -> None:
        self.processes = processes
        self.workdir = workdir
        self.port = port or free_port()
        self.extra = list(args)
        self.tls = tls
        self.conf = conf  # a config file's text (sentinels must have one they can rewrite)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, wait: bool = True) -> Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [redis_server_binary()]
        if self.conf is not None:
            conf_path = self.workdir / "redis.conf"
            conf_path.write_text(self.conf)
            args.append(str(conf_path))
        port_args = ["--port", "0", "--tls-port", str(self.port)] if self.tls else []
        args += port_args or ["--port", str(self.port)]
        args += ["--bind", "127.0.0.1", "--dir", str(self.workdir), "--save", "", *self.extra]
        self.process = self.processes.spawn(args, self.workdir / "redis.log")
        if wait and not self.tls:
            wait_for(self.answers, timeout=10, what=f"redis at port {self.port} to answer")
        return self

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kwargs)  # type: ignore[arg-type]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""


# -- cluster -----------------------------------------------------------------------------------

CLUSTER_NODE_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "2000",
    "--appendonly", "no",
)  # fmt: skip


class Cluster:
    """Three masters, no replicas: `redis-cli --cluster create`, or CLUSTER MEET/ADDSLOTS."""

    def __init__(self, processes: Processes, workdir: Path, size: int = 3) -> None:
        # The bus port is port + 10000 by default: past 65535 for a high free port.
        self.nodes = [
            Server(
                processes,
                workdir / f"node{i}",
                [*CLUSTER_NODE_ARGS, "--cluster-port", str(free_port())],
            )
            for i in range(size)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> Cluster:
        for node in self.nodes:
            node.start()
        cli = redis_cli_binary()
        if cli:
            addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *addresses,
                    "--cluster-replicas",
                    "0",
                    "--cluster-yes",
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
        else:  # what redis-cli does, by hand: split the 16384 slots, then introduce the nodes
            share = 16384 // len(self.nodes)
            for i, node in enumerate(self.nodes):
                last = 16383 if i == len(self.nodes) - 1 else (i + 1) * share - 1
                node.client().execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
            for node in self.nodes[1:]:
                node.client().execute_command("CLUSTER MEET", "127.0.0.1", self.nodes[0].port)
        for node in self.nodes:
            wait_for(
                lambda n=node: n.client().cluster("INFO").get("cluster_state") == "ok",
                timeout=30,
                interval=0.1,
                what=f"cluster_state:ok on port {node.port}",
            )
        return self

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)


# -- sentinel ----------------------------------------------------------------------------------

MASTER_NAME = "mymaster"


class SentinelSetup:
    """One master, one replica (`--replicaof`), three sentinels with a quorum of 2."""

    def __init__(
        self, processes: Processes, workdir: Path, master_args: Sequence[str] = ()
    ) -> None:
        common = ["--appendonly", "no", "--repl-diskless-sync", "yes",
                  "--repl-diskless-sync-delay", "0"]  # fmt: skip
        self.master = Server(processes, workdir / "master", [*common, *master_args])
        self.replica = Server(
            processes,
            workdir / "replica",
            [*common, "--replicaof", "127.0.0.1", str(self.master.port)],
        )
        self.sentinels = [
            Server(
                processes,
                workdir / f"sentinel{i}",
                ["--sentinel"],
                conf=(
                    f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                    f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                ),
            )
            for i in range(3)
        ]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> SentinelSetup:
        self.master.start()
        self.replica.start()
        wait_for(
            lambda: self.replica.client().info("replication").get("master_link_status") == "up",
            timeout=20,
            what="the replica in sync",
        )
        for sentinel in self.sentinels:
            sentinel.start()
        for sentinel in self.sentinels:  # each must know the replica and the other sentinels
            wait_for(
                lambda s=sentinel: self._sentinel_ready(s),
                timeout=30,
                interval=0.1,
                what=f"sentinel {sentinel.port} to see the replica and 2 other sentinels",
            )
        return self

    def _sentinel_ready(self, sentinel: Server) -> bool:
        try:
            info = sentinel.client().sentinel_master(MASTER_NAME)
        except redis.RedisError:
            return False
        return bool(info.get("num-slaves") == 1 and info.get("num-other-sentinels") == 2)

    def master_port(self) -> int | None:
        """The master the sentinels currently name (asked of the first one that answers)."""
        for sentinel in self.sentinels:
            try:
                reply = sentinel.client().sentinel_get_master_addr_by_name(MASTER_NAME)
            except redis.RedisError:
                continue
            if reply:
                return int(reply[1])
        return None


# -- TLS ---------------------------------------------------------------------------------------


def make_certificates(directory: Path, name: str = "ca") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, with `openssl`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        key: directory / f"{name}-{key}"
        for key in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")
    }

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN=rqworkers test {name}", "-keyout", str(files["ca.key"]),
        "-out", str(files["ca.crt"]))  # fmt: skip
    for role in ("server", "client"):
        csr = directory / f"{name}-{role}.csr"
        extensions = directory / f"{name}-{role}.ext"
        usage = "serverAuth" if role == "server" else "clientAuth"
        extensions.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=127.0.0.1 {role}",
            "-keyout", str(files[f"{role}.key"]), "-out", str(csr))  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(files["ca.crt"]),
            "-CAkey", str(files["ca.key"]), "-CAcreateserial", "-days", "2",
            "-extfile", str(extensions), "-out", str(files[f"{role}.crt"]))  # fmt: skip
    for path in files.values():
        os.chmod(path, 0o600)
    return files


def tls_server_args(certs: dict[str, Path]) -> list[str]:
    return [
        "--tls-cert-file", str(certs["server.crt"]),
        "--tls-key-file", str(certs["server.key"]),
        "--tls-ca-cert-file", str(certs["ca.crt"]),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
