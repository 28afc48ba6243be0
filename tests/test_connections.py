"""Redis deployments: Cluster, Sentinel, TLS, ACL users and error replies, against real servers.

Each test starts the real servers it needs on free 127.0.0.1 ports (see `tests/servers.py`)
and the real `rqworkers run`. The test handler records what it did in a separate plain
redis-server (the bookkeeper), so that a failover or an error on the Redis under test cannot
touch the record the assertions read.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from rqworkers import config
from rqworkers.errors import ConfigError
from rqworkers.store import connections
from rqworkers.store.connections import (
    connect,
    hash_tag,
    parse,
    queue_problem,
    url_problem,
)
from rqworkers.store.keys import Keys
from rqworkers.store.outage import REDIS_ERRORS, is_outage
from rqworkers.store.queue import ReliableQueue
from tests.servers import (
    Cluster,
    Processes,
    SentinelSetup,
    Server,
    make_certificates,
    server_supports_tls,
    server_version,
    tls_server_args,
)
from tests.support import (
    APPS,
    REPO,
    RedisServer,
    Service,
    free_port,
    internal_tracebacks,
    wait_for,
    write_config,
)

HANDLER = "testapp:handle"
FAST_MANAGER = {
    "check_interval": 0.2,
    "shutdown_timeout": 10.0,
    "node": "n1",
    "lease_ttl": 1.5,
    "reclaim_interval": 0.3,
}

# -- URL forms, without servers -----------------------------------------------------------


def test_a_cluster_url_lists_its_startup_nodes_and_keeps_credentials_and_tls() -> None:
    target = parse("rediss+cluster://app:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002?ssl_ca_certs=/ca")
    assert target.kind == "cluster" and target.tls
    assert target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert target.url == "rediss://app:pw@10.0.0.1:7000?ssl_ca_certs=/ca"


def test_a_sentinel_url_names_its_sentinels_master_and_database() -> None:
    target = parse("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/3")
    assert target.kind == "sentinel"
    assert target.nodes == (("s1", 26379), ("s2", 26380))
    assert (target.service, target.db) == ("mymaster", 3)
    assert parse("redis+sentinel://s1:26379/other").db == 0


def test_password_file_is_taken_out_of_the_url_given_to_redis_py(tmp_path: Path) -> None:
    target = parse("redis://worker@h:6379/0?password_file=/run/secrets/redis&db=2")
    assert target.password_file == "/run/secrets/redis"
    assert target.url == "redis://worker@h:6379/0?db=2"
    assert parse("unix:///run/r.sock?password_file=/s").url == "unix:///run/r.sock"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://h:7000?db=2", "only database 0"),
        ("redis+cluster://h:notaport", "no valid port"),
        ("redis+cluster://h:7000,,h:7001", "empty host"),
        ("redis+sentinel://s:26379", "/<master-name>"),
        ("redis+sentinel://s:26379/m/x", "must be a number"),
        ("redis://:pw@h/0?password_file=/run/secrets/x", "either a password or password_file"),
        ("redis://h/0?password=pw&password_file=/run/secrets/x", "either a password or"),
        ("redis://h/0?no_such_option=1", "does not accept"),
        ("rediss://h/0?ssl_cert_reqs=sometimes", "sometimes"),
        ("rediss://h/0?ssl_ca_certs=/nonexistent/ca.crt", "ssl_ca_certs /nonexistent/ca.crt"),
        ("redis://h/0?password_file=/nonexistent/secret", "does not exist"),
        ("redis+nothing://h", "must start with"),
        ("redis://h/0?encoding=nonsense", "encoding='nonsense' is not a text encoding"),
        ("redis://h/0?encoding_errors=whatever", "encoding_errors='whatever' is not"),
        ("redis://h/0?decode_responses=false", "decode_responses is not supported"),
        ("redis+sentinel://s:26379/m?decode_responses=1", "decode_responses is not supported"),
    ],
)
def test_url_problems_are_found_without_connecting(url: str, problem: str) -> None:
    found = url_problem(url)
    assert found is not None and problem in found, found


def test_a_password_file_that_exists_is_fine(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("pw\n")
    assert url_problem(f"redis://u@h:6379/0?password_file={secret}") is None
    assert connections.read_password(str(secret)) == "pw"


def test_a_password_file_that_is_no_file_is_refused_not_read(tmp_path: Path) -> None:
    """A FIFO would hang the connect that reads it; a device would fill the memory."""
    fifo = tmp_path / "secret"
    os.mkfifo(fifo)
    for path, kind in ((str(fifo), "a FIFO"), ("/dev/zero", "a character device")):
        found = url_problem(f"redis://u@h:6379/0?password_file={path}")
        assert found is not None and f"password_file {path} is {kind}" in found, found
        with pytest.raises(OSError, match=f"is {kind}, not a regular file"):
            connections.read_password(path)


@pytest.mark.parametrize(
    ("queue", "tag"),
    [("{jobs}", "jobs"), ("app:{jobs}:high", "jobs"), ("jobs", None), ("{}jobs", None),
     ("jo{bs", None), ("a}{b}", "b"), ("{a}{b}", "a")],
)  # fmt: skip
def test_hash_tag_follows_the_redis_cluster_rule(queue: str, tag: str | None) -> None:
    assert hash_tag(queue) == tag


def test_only_a_cluster_needs_a_hash_tag() -> None:
    problem = queue_problem("redis+cluster://h:7000", "jobs")
    assert problem is not None and "CROSSSLOT" in problem and "'{jobs}'" in problem
    assert queue_problem("redis+cluster://h:7000", "{jobs}") is None
    assert queue_problem("redis://h:6379/0", "jobs") is None
    assert queue_problem("redis+sentinel://h:26379/m", "jobs") is None


def test_config_rejects_a_cluster_queue_without_a_hash_tag(tmp_path: Path) -> None:
    path = tmp_path / "rqworkers.toml"
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    write_config(
        path, url, [{"queue": "jobs", "handler": HANDLER}, {"queue": "{ok}", "handler": HANDLER}]
    )
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    [line] = [p for p in caught.value.problems if "queue" in p]
    assert line.startswith("workers[0].queue: queue 'jobs' on a Redis Cluster needs a {hash tag}")
    assert not any("workers[1]" in p for p in caught.value.problems)


def test_redact_hides_every_secret_but_shows_the_password_file() -> None:
    shown = connections.redact(
        "rediss+sentinel://u:topsecret@s1:1,s2:2/m/0?password_file=/run/secrets/x"
        "&ssl_password=keysecret"
    )
    assert "topsecret" not in shown and "keysecret" not in shown
    assert shown.startswith("rediss+sentinel://u:***@s1:1,s2:2/m/0?")
    assert "password_file=/run/secrets/x" in shown and "ssl_password=***" in shown


def test_a_cluster_client_contacts_nobody_until_its_first_command() -> None:
    """A worker started while the cluster is down waits it out instead of crashing."""
    client = connect(f"redis+cluster://127.0.0.1:{free_port()}", timeout=0.5)
    queue = ReliableQueue(client, "{jobs}", "n:1")  # registers its scripts: no contact
    with pytest.raises(REDIS_ERRORS):
        queue.take([], 1)
    with pytest.raises(REDIS_ERRORS):  # and tries again on the next command
        client.ping()
    client.close()


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.kill_all()


@pytest.fixture
def bookkeeper(redis_server: RedisServer) -> RedisServer:
    """A plain redis-server where the test handler records `started` and `done`."""
    return redis_server


StartService = Callable[..., Service]


@pytest.fixture
def service(tmp_path: Path, bookkeeper: RedisServer) -> Iterator[StartService]:
    """`rqworkers run` against the given URL; every process is killed at teardown."""
    started: list[Service] = []

    def start(url: str, workers: list[dict[str, Any]], **sections: Any) -> Service:
        sections.setdefault("manager", FAST_MANAGER)
        path = write_config(tmp_path / f"rqworkers{len(started)}.toml", url, workers, **sections)
        svc = Service(path, tmp_path, service_env(bookkeeper)).start()
        started.append(svc)
        return svc

    try:
        yield start
    finally:
        for svc in started:
            svc.cleanup()


def service_env(bookkeeper: RedisServer) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RQWORKERS_CONFIG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(APPS), str(REPO)])
    env["TESTAPP_REDIS_URL"] = bookkeeper.url
    return env


def check(
    tmp_path: Path, url: str, queue: str, bookkeeper: RedisServer
) -> subprocess.CompletedProcess[str]:
    path = write_config(
        tmp_path / f"check-{time.monotonic_ns()}.toml", url, [{"queue": queue, "handler": HANDLER}]
    )
    return subprocess.run(
        [sys.executable, "-m", "rqworkers", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        env=service_env(bookkeeper),
        cwd=tmp_path,
        timeout=60,
    )


def done(bookkeeper: RedisServer) -> list[bytes]:
    return list(bookkeeper.client().lrange("done", 0, -1))


def wait_done(bookkeeper: RedisServer, expected: set[bytes], timeout: float = 20.0) -> None:
    wait_for(
        lambda: expected <= set(done(bookkeeper)),
        timeout=timeout,
        what=f"{len(expected)} messages handled",
    )


def outage_lines(svc: Service, cause: str) -> list[str]:
    """The workers' (not the keeper's) log lines that report an outage with `cause`."""
    return [
        line
        for line in svc.output().splitlines()
        if "failed:" in line and cause in line and "keeper" not in line
    ]


# -- Redis Cluster -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if server_version() < (7, 0):  # --cluster-port: the bus port of a high free port
        pytest.skip("the cluster fixture needs redis-server 7.0 or later")
    started = Processes()
    try:
        yield Cluster(started, tmp_path_factory.mktemp("cluster")).start()
    finally:
        started.kill_all()


def test_cluster_fetch_ack_dead_letter_and_orphan_reclaim_end_to_end(
    cluster: Cluster, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    client = cluster.client()
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    # A node that died with two messages in its private list, and no lease left.
    client.rpush(Keys("{jobs}", "gone:1").processing, b"orphan-2", b"orphan-1")
    client.sadd(Keys("{jobs}").registry, "gone:1")
    svc = service(
        cluster.url,
        [
            {"queue": "{jobs}", "handler": HANDLER, "max_attempts": 2, "retry_delay": 0.1},
            {"queue": "{other}", "handler": HANDLER},
        ],
    )
    svc.wait_workers(2)
    messages = {f"m{i}".encode() for i in range(30)}
    client.lpush("{jobs}", *sorted(messages), b"raise")
    client.lpush("{other}", b"o1")
    wait_done(bookkeeper, messages | {b"orphan-1", b"orphan-2", b"o1"})
    wait_for(lambda: client.lrange(Keys("{jobs}").dead, 0, -1) == [b"raise"], what="poison dead")
    assert Counter(bookkeeper.client().lrange("started", 0, -1))[b"raise"] == 2
    assert re.search(r"reclaimed 2 message\(s\) of \{jobs\}", svc.output())
    # Acked: the private lists are gone; the keeper renews leases in two slots at once.
    wait_for(lambda: not client.keys(Keys("{jobs}", "*").processing), what="empty private lists")
    assert client.llen("{jobs}") == 0 and client.keys(Keys("{jobs}", "*").processing) == []
    leases = [Keys("{jobs}", "n1:1").lease, Keys("{other}", "n1:1").lease]
    assert len({client.get_node_from_key(key).name for key in leases}) == 2, "two nodes"
    # The keeper's status, not the worker's placeholder: the keeper renewed both leases in
    # one non-transactional pipeline, which redis-py splits by node.
    wait_for(
        lambda: all(b'"node": "n1"' in (client.get(key) or b"") for key in leases),
        what="leases renewed by the keeper",
    )
    assert internal_tracebacks(svc.output()) == []

    ok = check(tmp_path, cluster.url, "{jobs}", bookkeeper)
    assert ok.returncode == 0, ok.stderr
    untagged = check(tmp_path, cluster.url, "jobs", bookkeeper)
    assert untagged.returncode == 2, untagged
    assert "workers[0].queue: queue 'jobs' on a Redis Cluster needs a {hash tag}" in (
        untagged.stderr
    )
    assert "CROSSSLOT" in untagged.stderr and "Traceback" not in untagged.stderr


# -- Sentinel ------------------------------------------------------------------------------


class Producer:
    """LPUSHes numbered messages through a Sentinel URL, retrying through outages.

    WAIT-free, like most producers: a message counts as acknowledged when LPUSH returned.
    """

    def __init__(self, url: str, command: str = "n", padding: int = 0) -> None:
        self.client = connect(url, timeout=2.0)
        self.command = command  # the test handler's: "sleep:0.004" makes it take 4ms
        self.padding = b"." * padding  # big messages outgrow the kernel's socket buffers
        self.pause = 0.002  # between messages: about 500 a second
        self.acked: dict[bytes, float] = {}  # payload -> when LPUSH returned
        self.refused: Counter[str] = Counter()  # errors seen: a reply's code, or the class
        self.next = 0

    def run(self, stop: Callable[[], bool], tick: Callable[[], None] = lambda: None) -> None:
        """Push until `stop()`; a message still unacknowledged then is abandoned."""
        while not stop():
            payload = f"{self.command}:{self.next}:".encode() + self.padding
            self.next += 1
            while not stop():
                tick()
                try:
                    self.client.lpush("stream", payload)
                except REDIS_ERRORS as exc:
                    code = str(exc).split(" ")[0] if type(exc) is redis.ResponseError else ""
                    self.refused[code or type(exc).__name__] += 1
                    time.sleep(0.05)
                    continue
                self.acked[payload] = time.monotonic()
                time.sleep(self.pause)
                break

    def close(self) -> None:
        self.client.close()


class Timeline:
    """Runs each action once when its time, in seconds from the start, has come."""

    def __init__(self, *events: tuple[float, Callable[[], None]]) -> None:
        self.start = time.monotonic()
        self.pending = sorted(events, key=lambda e: e[0])
        self.fired: dict[str, float] = {}

    def __call__(self) -> None:
        while self.pending and time.monotonic() - self.start >= self.pending[0][0]:
            _, action = self.pending.pop(0)
            action()
            self.fired[action.__name__] = time.monotonic()


MIN_REPLICAS = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "1"]


@pytest.mark.parametrize(
    ("master_args", "stall"),
    [
        ([], 0.0),
        (MIN_REPLICAS, 0.0),
        ([], 4.0),
        # 14 s on 2 cores, as the one above: with `-m slow`, for the default suite's budget.
        pytest.param(MIN_REPLICAS, 4.0, marks=pytest.mark.slow),
    ],
    ids=["async", "min-replicas", "async-lagging-replica", "min-replicas-lagging-replica"],
)
def test_sentinel_failover_is_followed_and_the_loss_is_measured(
    processes: Processes,
    service: StartService,
    bookkeeper: RedisServer,
    tmp_path: Path,
    master_args: list[str],
    stall: float,
) -> None:
    """SIGKILL the master mid-stream; with `stall`, after the replica has lagged that long.

    A SIGKILLed process's socket buffers are still delivered, so on one machine only what
    Redis had not yet written to the replica's socket can be lost. A replica that stops
    reading (SIGSTOP: a stand-in for a slow or cut network) makes the master's buffer grow
    with acknowledged writes: those are what a failover loses.
    """
    setup = SentinelSetup(processes, tmp_path / "sentinel", master_args).start()
    assert check(tmp_path, setup.url, "stream", bookkeeper).returncode == 0
    svc = service(setup.url, [{"queue": "stream", "handler": HANDLER}])
    svc.wait_workers(1)
    old_master = setup.master.port
    replica = setup.replica.process
    assert replica is not None

    def stall_replica() -> None:
        replica.send_signal(signal.SIGSTOP)

    def kill_master() -> None:
        setup.master.kill()
        replica.send_signal(signal.SIGCONT)

    events = [(1.0, stall_replica), (1.0 + stall, kill_master)] if stall else [(1.0, kill_master)]
    timeline = Timeline(*events)
    # With a lagging replica, the handler is slowed down too: what a failover loses is what
    # was neither replicated nor handled yet, and a loss needs a backlog to show.
    producer = Producer(setup.url, "sleep:0.004" if stall else "n", 10_000 if stall else 0)
    try:
        # Until shortly after the kill: the last pushes wait for the new master, or give up.
        producer.run(lambda: time.monotonic() - timeline.start > events[-1][0] + 0.5, timeline)
        before = dict(producer.acked)
        wait_for(lambda: setup.master_port() not in (None, old_master), timeout=30, what="failover")
        producer.command = "n"
        producer.run(lambda: len(producer.acked) >= len(before) + 100)
    finally:
        producer.close()
    after = set(producer.acked) - set(before)
    wait_done(bookkeeper, after, timeout=40)
    new_master = redis.Redis(port=setup.master_port() or 0, socket_timeout=5)
    wait_for(
        lambda: (
            new_master.llen("stream") == 0 and not new_master.keys(Keys("stream", "*").processing)
        ),
        timeout=20,
        what="the queue drained on the new master",
    )
    handled = Counter(done(bookkeeper))
    lost = [p for p in before if p not in handled]
    killed_at = timeline.fired["kill_master"]
    since_stall = timeline.fired.get("stall_replica", killed_at)
    lost_window = [before[p] - since_stall for p in lost]
    print(
        f"\nsentinel, {' '.join(master_args) or 'asynchronous replication'}, replica stalled "
        f"{stall:g}s: {len(before)} acked before the failover, {len(after)} after; "
        f"lost {len(lost)} (acked {min(lost_window, default=0):.2f}s to "
        f"{max(lost_window, default=0):.2f}s after the replica stopped reading); "
        f"handled twice {sum(n - 1 for n in handled.values() if n > 1)}; "
        f"refused while pushing: {dict(producer.refused)}"
    )
    # Guaranteed: the service follows the failover (everything pushed to the new master is
    # handled), and only writes the replica had not received can be lost: none acked
    # before the replica stopped reading, none after the master died.
    assert all(w >= -0.01 for w in lost_window) and all(before[p] <= killed_at for p in lost)
    if "--min-replicas-to-write" in master_args and stall:
        # The master refused writes once the replica's lag passed 1s: acks come every second
        # and the count of good replicas is refreshed every second, so within 3s of the
        # stall. The loss is bounded in time, however long the replica lags.
        assert producer.refused["NOREPLICAS"] > 0
        assert max(lost_window, default=0) < 3.5, lost_window
    assert "is back after" in svc.output()
    assert internal_tracebacks(svc.output()) == []


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, Path]:
    try:
        return make_certificates(tmp_path / "certs")
    except FileNotFoundError:
        pytest.skip("no openssl command to make certificates with")


def tls_url(port: int, certs: dict[str, Path], client_cert: bool = True) -> str:
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={quote(str(certs['ca.crt']))}"
    if client_cert:
        url += f"&ssl_certfile={certs['client.crt']}&ssl_keyfile={certs['client.key']}"
    return url


def test_tls_with_a_ca_file_and_a_client_certificate_end_to_end(
    processes: Processes,
    service: StartService,
    bookkeeper: RedisServer,
    certificates: dict[str, Path],
    tmp_path: Path,
) -> None:
    if not server_supports_tls():
        pytest.skip("this redis-server was built without TLS")
    server = Server(processes, tmp_path / "tls", tls_server_args(certificates), tls=True).start()
    url = tls_url(server.port, certificates)
    client = connect(url, timeout=2.0)
    wait_for(lambda: _answers(client), what="the TLS server")
    svc = service(url, [{"queue": "jobs", "handler": HANDLER}])
    svc.wait_workers(1)
    client.lpush("jobs", b"a", b"b", b"c")
    wait_done(bookkeeper, {b"a", b"b", b"c"})
    assert check(tmp_path, url, "jobs", bookkeeper).returncode == 0

    other = make_certificates(tmp_path / "other", "other")
    wrong_ca = check(tmp_path, tls_url(server.port, other), "jobs", bookkeeper)
    assert wrong_ca.returncode == 1, wrong_ca
    assert "certificate verify failed" in wrong_ca.stderr, wrong_ca.stderr
    no_client_cert = check(tmp_path, tls_url(server.port, certificates, False), "jobs", bookkeeper)
    assert no_client_cert.returncode == 1, no_client_cert
    assert "Traceback" not in wrong_ca.stderr + no_client_cert.stderr
    print(f"\nwrong CA: {wrong_ca.stderr.strip()}\nno client certificate: {no_client_cert.stderr}")


def _answers(client: connections.Client) -> bool:
    try:
        return bool(client.ping())
    except REDIS_ERRORS:
        return False


# -- ACL users -----------------------------------------------------------------------------


def test_acl_user_password_and_password_file_and_no_leak_of_a_wrong_password(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    server = Server(processes, tmp_path / "acl").start()
    server.client().acl_setuser("worker", enabled=True, passwords=["+s3cret"], keys="*",
                                channels="*", commands=["+@all"])  # fmt: skip
    server.client().acl_setuser("default", enabled=False)  # nobody gets in without a password
    admin = redis.Redis(port=server.port, username="worker", password="s3cret", socket_timeout=5)
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")  # as Docker secrets often are: with a newline
    base = f"redis://worker:s3cret@127.0.0.1:{server.port}/0"
    from_file = f"redis://worker@127.0.0.1:{server.port}/0?password_file={secret}"
    svc = service(
        base,
        [{"queue": "a", "handler": HANDLER}, {"host": from_file, "queue": "b", "handler": HANDLER}],
    )
    svc.wait_workers(2)
    admin.lpush("a", b"a1", b"a2")
    admin.lpush("b", b"b1", b"b2")
    wait_done(bookkeeper, {b"a1", b"a2", b"b1", b"b2"})
    assert check(tmp_path, from_file, "b", bookkeeper).returncode == 0

    wrong = "Wr0ng-pa55word"
    bad_url = f"redis://worker:{wrong}@127.0.0.1:{server.port}/0"
    result = check(tmp_path, bad_url, "a", bookkeeper)
    assert result.returncode == 1, result
    assert "invalid username-password pair" in result.stderr, result.stderr
    assert f"redis://worker:***@127.0.0.1:{server.port}/0" in result.stderr
    assert wrong not in result.stdout + result.stderr
    bad_file = tmp_path / "wrong-password"
    bad_file.write_text(wrong)
    result = check(tmp_path, f"{from_file.split('?')[0]}?password_file={bad_file}", "a", bookkeeper)
    assert result.returncode == 1 and wrong not in result.stdout + result.stderr

    bad = service(bad_url, [{"queue": "c", "handler": HANDLER}])
    bad.wait_workers(1)
    wait_for(lambda: outage_lines(bad, "invalid username-password"), what="the auth failure")
    time.sleep(1.0)  # a few retries with backoff
    assert len(outage_lines(bad, "invalid username-password")) == 1, bad.output()
    assert wrong not in bad.output() and "s3cret" not in svc.output()


def test_a_password_file_swapped_for_a_fifo_is_one_line_per_start_and_backs_off(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    """The password file is read at every worker start: a FIFO swapped in since `check` used
    to end each start in "crashed" and twenty lines of traceback."""
    server = Server(processes, tmp_path / "auth").start()
    server.client().config_set("requirepass", "s3cret")
    admin = redis.Redis(port=server.port, password="s3cret", socket_timeout=5)
    secret = tmp_path / "redis-password"
    secret.write_text("s3cret\n")
    url = f"redis://127.0.0.1:{server.port}/0?password_file={secret}"
    svc = service(url, [{"queue": "a", "handler": HANDLER}])
    (worker,) = svc.wait_workers(1)
    admin.lpush("a", b"before")
    wait_done(bookkeeper, {b"before"})

    secret.unlink()
    os.mkfifo(secret)
    worker.kill()  # its replacement reads the password file anew
    problem = f"password_file {secret} is a FIFO, not a regular file"
    wait_for(lambda: len(_lines_with(svc, problem)) >= 3, timeout=20, what="three failed starts")
    output = svc.output()
    assert "Traceback" not in output and "crashed" not in output, output
    assert all("cannot connect to redis://" in line for line in _lines_with(svc, problem))
    assert len(_lines_with(svc, "startup failed")) >= 2, output  # the manager backs off
    assert len(_lines_with(svc, problem)) <= 6, output  # 0 s, 0.5 s, 1 s, 2 s ... apart

    secret.unlink()
    secret.write_text("s3cret\n")
    svc.wait_workers(1, timeout=30)
    admin.lpush("a", b"after")
    wait_done(bookkeeper, {b"after"}, timeout=30)


def _lines_with(svc: Service, text: str) -> list[str]:
    return [line for line in svc.output().splitlines() if text in line]


# -- error replies: OOM and NOPERM ---------------------------------------------------------


# redis-py takes the error code (OOM, NOPERM) off the messages of the exceptions it maps.
_OOM = "command not allowed when used memory > 'maxmemory'"
_NOPERM = "no permissions to run the 'evalsha' command"


def test_out_of_memory_drains_what_waits_then_the_idle_fetch_waits_it_out(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    """Over maxmemory (noeviction), the scripts that only move messages still run, so the
    queue drains (issue 17); the idle worker's blocking fetch is refused: waited out,
    logged once, until memory is back."""
    server = Server(processes, tmp_path / "oom", ["--maxmemory-policy", "noeviction"]).start()
    client = server.client()
    messages = [f"m{i}".encode() for i in range(20)]
    client.lpush("jobs", *messages)
    client.set("filler", b"x" * 2_000_000)
    client.config_set("maxmemory", "1mb")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", b"1")
    svc = service(server.url, [{"queue": "jobs", "handler": HANDLER}])
    svc.wait_workers(1)
    wait_done(bookkeeper, set(messages))
    wait_for(lambda: outage_lines(svc, _OOM), what="OOM logged")
    time.sleep(1.0)
    [line] = outage_lines(svc, _OOM)
    assert "Redis out of memory (maxmemory reached, nothing evictable)" in line
    print(f"\n{line}")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        client.set("probe", b"1")  # still out of memory
    client.config_set("maxmemory", "0")
    client.lpush("jobs", b"after")
    wait_done(bookkeeper, {b"after"})
    assert sorted(done(bookkeeper)) == sorted([*messages, b"after"]), "each handled once"
    wait_for(lambda: "is back after" in svc.output(), what="recovery logged")


def test_a_missing_acl_permission_is_waited_out_and_nothing_is_lost(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    server = Server(processes, tmp_path / "noperm").start()
    client = server.client()
    client.acl_setuser(
        "limited",
        enabled=True,
        passwords=["+pw"],
        keys="*",
        channels="*",
        commands=["+@all", "-evalsha", "-blmove", "-brpoplpush"],
    )
    messages = [f"m{i}".encode() for i in range(20)]
    client.lpush("jobs", *messages)
    url = f"redis://limited:pw@127.0.0.1:{server.port}/0"
    svc = service(url, [{"queue": "jobs", "handler": HANDLER}])
    svc.wait_workers(1)
    wait_for(lambda: outage_lines(svc, _NOPERM), what="NOPERM logged")
    time.sleep(1.0)
    [line] = outage_lines(svc, _NOPERM)
    assert "Redis refused the credentials or a permission (NoPermissionError): this user" in line
    print(f"\n{line}")
    assert not done(bookkeeper)
    client.acl_setuser("limited", commands=["+evalsha", "+blmove", "+brpoplpush"])
    wait_done(bookkeeper, set(messages))
    assert sorted(done(bookkeeper)) == sorted(messages), "each handled once"


def test_a_read_only_replica_is_waited_out_until_it_is_promoted(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    master = Server(processes, tmp_path / "master").start()
    replica = Server(
        processes, tmp_path / "replica", ["--replicaof", "127.0.0.1", str(master.port)]
    ).start()
    messages = [f"m{i}".encode() for i in range(20)]
    master.client().lpush("jobs", *messages)
    wait_for(lambda: replica.client().llen("jobs") == 20, what="replicated")
    # Pointed at the replica, as after a failover the old master becomes one.
    svc = service(replica.url, [{"queue": "jobs", "handler": HANDLER}])
    svc.wait_workers(1)
    wait_for(lambda: outage_lines(svc, "ReadOnlyError"), what="READONLY logged")
    time.sleep(1.0)
    assert len(outage_lines(svc, "ReadOnlyError")) == 1, "once per outage, not per retry"
    assert not done(bookkeeper)
    replica.client().execute_command("REPLICAOF", "NO", "ONE")
    wait_done(bookkeeper, set(messages))
    assert sorted(done(bookkeeper)) == sorted(messages), "each handled once"


# -- errors that say what is wrong, fast ---------------------------------------------------------


@pytest.mark.service
def test_no_sentinel_answering_is_one_line_naming_each_sentinel_and_fast(
    bookkeeper: RedisServer, tmp_path: Path
) -> None:
    ports = [free_port() for _ in range(3)]  # nothing listens there
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in ports) + "/mymaster"
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError) as caught:
        connect(url, timeout=1.0).ping()
    assert time.monotonic() - started < 1.0, "no retries, no backoff"
    message = str(caught.value)
    assert message.startswith("no master 'mymaster' from 3 sentinel(s): 127.0.0.1:")
    assert all(f"127.0.0.1:{p} ConnectionError" in message for p in ports), message
    assert "\n" not in message and "<redis" not in message and len(message) < 600, message

    started = time.monotonic()
    result = check(tmp_path, url, "jobs", bookkeeper)
    took = time.monotonic() - started
    print(f"\ncheck took {took:.2f}s: {result.stderr.strip()}")
    assert result.returncode == 1 and took < 5.0, (took, result)
    assert len(result.stderr) < 1000 and "<redis" not in result.stderr, result.stderr


@pytest.mark.service
def test_tls_errors_name_their_likely_cause_and_honour_the_connect_timeout(
    processes: Processes, bookkeeper: RedisServer, certificates: dict[str, Path], tmp_path: Path
) -> None:
    if not server_supports_tls():
        pytest.skip("this redis-server was built without TLS")
    server = Server(processes, tmp_path / "tls", tls_server_args(certificates), tls=True).start()
    wait_for(lambda: _answers(connect(tls_url(server.port, certificates), timeout=2.0)))
    with pytest.raises(redis.ConnectionError) as no_certificate:
        connect(tls_url(server.port, certificates, client_cert=False), timeout=2.0).ping()
    said = str(no_certificate.value)
    assert "requires a client certificate" in said and "ssl_certfile and ssl_keyfile" in said
    result = check(tmp_path, tls_url(server.port, certificates, False), "jobs", bookkeeper)
    assert result.returncode == 1 and "requires a client certificate" in result.stderr

    plain = Server(processes, tmp_path / "plain").start()
    for timeout, client in ((1.0, connect(f"rediss://127.0.0.1:{plain.port}/0", timeout=1.0)),
                            (5.0, connect(f"rediss://127.0.0.1:{plain.port}/0"))):  # fmt: skip
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError) as no_answer:
            client.ping()
        took = time.monotonic() - started
        assert timeout <= took < timeout + 1.0, f"{took:.2f}s for a {timeout:g}s connect timeout"
        assert f"TLS connection to 127.0.0.1:{plain.port} got no answer within {timeout:g}s" in (
            str(no_answer.value)
        )
        assert "use redis:// instead of rediss://" in str(no_answer.value)


# -- prompt resumption -------------------------------------------------------------------------

RESUME_WITHIN = 2.0  # seconds from Redis answering again to a new message being handled


def resumption_delay(push: Callable[[], None], bookkeeper: RedisServer) -> float:
    """Seconds from now, when Redis answers again, to the message `push` sends being done."""
    back = time.monotonic()
    push()
    wait_for(lambda: b"after" in done(bookkeeper), timeout=30, what="the message after")
    return time.monotonic() - back


@pytest.mark.slow  # 12 s on 2 cores: with `-m slow`, for the default suite's budget (the
# end-to-end Cluster test and the Cluster unit tests stay in it)
def test_workers_resume_promptly_after_a_cluster_node_is_back(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    if server_version() < (7, 0):
        pytest.skip("the cluster helper needs redis-server 7.0 or later")
    cluster = Cluster(processes, tmp_path / "own-cluster").start()
    client = cluster.client()
    svc = service(cluster.url, [{"queue": "{jobs}", "handler": HANDLER}])
    svc.wait_workers(1)
    client.lpush("{jobs}", b"before")
    wait_for(lambda: b"before" in done(bookkeeper), what="a message before")
    owner = client.get_node_from_key("{jobs}").port
    node = next(n for n in cluster.nodes if n.port == owner)
    node.kill()
    wait_for(lambda: outage_lines(svc, ""), what="the worker to see the outage")
    time.sleep(6)  # the outage itself: long enough for any backoff to have grown
    node.start()
    wait_for(
        lambda: node.client().cluster("INFO").get("cluster_state") == "ok",
        timeout=30,
        what="the node back in an ok cluster",
    )
    delay = resumption_delay(lambda: cluster.client().lpush("{jobs}", b"after"), bookkeeper)
    print(f"\ncluster: resumed {delay:.2f}s after the node answered again")
    assert delay < RESUME_WITHIN


@pytest.mark.slow  # 10 to 17 s on 2 cores: with `-m slow`, for the default suite's budget
def test_workers_resume_promptly_after_a_sentinel_failover_with_the_first_sentinel_down(
    processes: Processes, service: StartService, bookkeeper: RedisServer, tmp_path: Path
) -> None:
    setup = SentinelSetup(processes, tmp_path / "sentinel").start()
    svc = service(setup.url, [{"queue": "jobs", "handler": HANDLER}])
    svc.wait_workers(1)
    old = setup.master.port
    setup.sentinels[0].kill()  # the first one listed: every lookup starts with a dead one
    setup.master.kill()
    new = wait_for(lambda: setup.master_port() not in (None, old) and setup.master_port(),
                   timeout=30, what="the failover")  # fmt: skip
    master = redis.Redis(port=int(new), socket_timeout=5)
    wait_for(lambda: master.info("replication")["role"] == "master", what="the new master")
    delay = resumption_delay(lambda: master.lpush("jobs", b"after"), bookkeeper)
    print(f"\nsentinel: resumed {delay:.2f}s after the sentinels named the new master")
    assert delay < RESUME_WITHIN
    lines = outage_lines(svc, "")
    assert lines and all(len(line) < 1000 for line in lines), lines


@pytest.mark.parametrize(
    ("reply", "outage"),
    [
        ("OOM command not allowed when used memory > 'maxmemory'.", True),
        ("READONLY You can't write against a read only replica.", True),
        ("NOPERM this user has no permissions to run the 'evalsha' command", True),
        ("LOADING Redis is loading the dataset in memory", True),
        ("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.", True),
        ("TRYAGAIN Multiple keys request during rehashing of slot", True),
        # Redis 7 passes a script's failed command on with its own code ...
        ("WRONGTYPE Operation against a key holding the wrong kind of value script: 08, on", False),
        ("user_script:1: attempt to concatenate a boolean value script: d4, on", False),
        # ... older servers wrap it
        ("ERR Error running script (call to f_08): @user_script:9: -OOM command not allowed", True),
        ("ERR Error running script (call to f_08): @user_script:3: -READONLY You can't", True),
        ("ERR Error running script (call to f_08): @user_script:1: WRONGTYPE Operation", False),
        ("ERR unknown command 'BLMOVE'", False),
    ],
)
def test_only_replies_that_waiting_can_cure_count_as_an_outage(reply: str, outage: bool) -> None:
    assert is_outage(redis.ResponseError(reply)) is outage
    assert is_outage(redis.ConnectionError("Connection refused")) is True
