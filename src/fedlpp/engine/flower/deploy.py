"""A real deployment's commands: test keys, a TLS SuperLink with node authentication, SuperNodes, a run.

These start Flower 1.41's own programs (``flower-superlink``, ``flower-supernode``, ``flwr``)
with the settings fedlpp needs and nothing else: telemetry, update checks and runtime
dependency installation off; TLS; node authentication; each node's data path validated
before its SuperNode starts; the experiment submitted as the Flower App in ``flower-app/``
(whose code is the installed fedlpp package) and followed to its end.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlpp.data.examples_file import read_examples
from fedlpp.engine.flower import FLOWER_ENV
from fedlpp.engine.flower.node import TASK_POLL_ENV

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
FEDLPP_MODULE = ("-m", "fedlpp.cli")  # what Python runs for the ``fedlpp`` command
CONNECTION = "fedlpp"  # the connection name in the private FLWR_HOME of a fedlpp command
APP_DIR = Path(__file__).resolve().parents[2] / "assets" / "flower-app"  # the Flower App: a pyproject.toml naming fedlpp's apps
DONE = "finished:"
LOOPBACK = "127.0.0.1"
SUPEREXEC_POLL_S = 0.5  # a submitted run's ServerApp starts within this (Flower: 1 s); each look costs the SuperLink CPU


class DeployError(RuntimeError):
    """A deployment step cannot go on; the message says what to fix."""


# --- keys and certificates for a test setup -------------------------------------------------------


def make_keys(directory: Path, nodes: int, hosts: Sequence[str] = ()) -> list[Path]:
    """A CA, a server certificate for localhost/127.0.0.1 (and ``hosts``), and ``nodes`` ECDSA node keys.

    For a test setup: a production CA keeps its key elsewhere. Returns the node key paths
    (``node-K``; the public key is ``node-K.pub``, in OpenSSH format as Flower wants).
    """
    directory.mkdir(parents=True, exist_ok=True)
    names = [CA_CERT, SERVER_CERT, SERVER_KEY] + [f"node-{k}{ext}" for k in range(nodes) for ext in ("", ".pub")]
    existing = [n for n in names if (directory / n).exists()]
    if existing:
        raise DeployError(f"{directory / existing[0]} exists; keys are never overwritten (choose another folder)")
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate(_name("fedlpp test CA"), _name("fedlpp test CA"), ca_key.public_key(), ca_key, is_ca=True)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(_name("localhost"), ca.subject, server_key.public_key(), ca_key, is_ca=False, hosts=hosts)
    (directory / CA_CERT).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / SERVER_CERT).write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(
        directory / SERVER_KEY,
        server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return [make_node_key(directory / f"node-{k}") for k in range(nodes)]


def make_node_key(path: Path) -> Path:
    """An ECDSA P-384 key pair in OpenSSH format: ``path`` (private, 0600) and ``path.pub`` (what travels)."""
    public = path.with_name(path.name + ".pub")
    if path.exists() or public.exists():
        raise DeployError(f"{path if path.exists() else public} exists; keys are never overwritten")
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" {path.name}\n".encode())
    return path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    is_ca: bool,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if not is_ca:
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1")),
        ]
        names += [_general_name(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(signer, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    """A new file readable by its owner only (refused if it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# --- the programs ---------------------------------------------------------------------------------


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """This environment with Flower's switches off and this Python's scripts first on PATH.

    The SuperLink and SuperNode start helper programs (flower-superexec, flwr-serverapp,
    flwr-clientapp) found through PATH: they must be this installation's.
    """
    env = {**os.environ, **FLOWER_ENV}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def program(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeployError(f"{name} is not installed beside {sys.executable} (install fedlpp with ./install.sh)")
    return str(path)


def superlink_command(keys: Path, host: str, port: int) -> list[str]:
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (keys / name).is_file():
            raise DeployError(f"{keys / name} is missing: make the keys with `fedlpp deploy keys {keys}`")
    return [
        program("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--ssl-ca-certfile",
        str(keys / CA_CERT),
        "--ssl-certfile",
        str(keys / SERVER_CERT),
        "--ssl-keyfile",
        str(keys / SERVER_KEY),
        "--enable-supernode-auth",
    ]


def _node_value(value: float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if not (value >= 0 and value < float("inf")):
        raise DeployError(f"expected a non-negative number, got {value!r}")
    return repr(float(value))


def supernode_args(
    superlink: str,
    ca: Path,
    key: Path,
    data: Path,
    client_id: int | None,
    host: str,
    port: int,
    connect_timeout: float,
    policy: Mapping[str, float | bool] | None = None,
) -> list[str]:
    """Flower's SuperNode arguments, after checking the node's data file parses (a clear error, not a failed round later).

    ``--isolation process``: the SuperNode launches no ClientApp processes; fedlpp's warm
    worker serves its messages (``node.py``). ``--max-wait-time``: it gives up after
    ``connect_timeout`` seconds without reaching the SuperLink.
    """
    examples = read_examples(data)
    if not key.is_file():
        raise DeployError(f"{key}: no such node key (make one with `fedlpp deploy node-key`)")
    if not ca.is_file():
        raise DeployError(f"{ca}: no such CA certificate")
    if not connect_timeout > 0:
        raise DeployError(f"--connect-timeout={connect_timeout:g}: expected a positive number of seconds")
    node_config = f'data-path="{_quotable(data.resolve())}"' + (f" client-id={client_id}" if client_id is not None else "")
    node_config += "".join(f" {k}={_node_value(v)}" for k, v in (policy or {}).items() if v)  # what this node requires
    print(f"fedlpp: {data} holds {len(examples)} examples; starting a SuperNode for {superlink}", flush=True)
    return [
        "--superlink",
        superlink,
        "--root-certificates",
        str(ca.resolve()),
        "--auth-supernode-private-key",
        str(key.resolve()),
        "--host",
        host,
        "--port",
        str(port),
        "--isolation",
        "process",
        "--max-wait-time",
        f"{connect_timeout:g}",
        "--node-config",
        node_config,
    ]


def run_node(
    args: list[str], host: str, port: int, superlink: str, connect_timeout: float, flwr_home: Path | None, threads: int | None
) -> int:
    """This node until it is stopped: its SuperNode and fedlpp's warm worker (``node.py``); the exit code."""
    from fedlpp.engine.flower.node import NodeProcess

    if threads is not None:
        if threads < 1:
            raise DeployError(f"--threads={threads}: expected a positive number")
        import torch

        torch.set_num_threads(threads)
    runtime = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return NodeProcess(args, runtime, superlink, flower_env(flwr_home), connect_timeout).run()


def _quotable(path: Path) -> str:
    """A path that Flower's ``key="value"`` configs can carry as it is."""
    if any(c in "\"'\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in str(path)):
        raise DeployError(f"{path}: a path with quotes, backslashes or control characters cannot be passed to Flower; rename it")
    return str(path)


def exec_program(command: list[str], flwr_home: Path | None = None) -> None:
    """Replace this process with ``command`` (so that stopping it stops the program itself).

    The SuperLink's SuperExec looks for a ServerApp to launch every
    ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds: SUPEREXEC_POLL_S unless set (Flower: 1 s).
    """
    sys.stdout.flush()
    env = flower_env(flwr_home)
    env.setdefault(TASK_POLL_ENV, str(SUPEREXEC_POLL_S))
    os.execve(command[0], command, env)


# --- the flwr command line: a private connection per call -----------------------------------------


@dataclass(frozen=True)
class Connection:
    superlink: str  # host:port of the SuperLink's one endpoint
    ca: Path  # the CA certificate that signed its TLS certificate

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory(prefix="fedlpp-flwr-") as home:
            config = {
                "superlink": {
                    "default": CONNECTION,
                    CONNECTION: {"address": self.superlink, "root-certificates": str(self.ca.resolve())},
                }
            }
            (Path(home) / "config.toml").write_text(tomli_w.dumps(config))
            return subprocess.run(
                [program("flwr"), *args], capture_output=True, text=True, timeout=timeout, env=flower_env(Path(home)), check=False
            )

    def flwr_json(self, *args: str) -> dict:
        done = self.flwr(*args, "--format", "json")
        try:
            out = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise DeployError(f"flwr {' '.join(args)} failed: {(done.stderr or done.stdout).strip()[-2000:]}") from None
        if not out.get("success", False):
            raise DeployError(f"flwr {' '.join(args)} failed: {out.get('error-message', out)}")
        return out

    def register(self, public_key: Path) -> int:
        if not public_key.is_file():
            raise DeployError(f"{public_key}: no such public key")
        return int(self.flwr_json("supernode", "register", str(public_key), CONNECTION)["node-id"])

    def submit(self, config: Path, out: Path, resume: bool, audit: Path | None = None, overrides: Sequence[str] = ()) -> int:
        audit_path = _quotable(audit.resolve()) if audit is not None else ""
        if any(c in o for o in overrides for c in "'\"\\ \n"):
            raise DeployError(f"overrides {list(overrides)}: quotes, backslashes and spaces cannot travel in Flower's run config")
        run_config = (
            f"config='{_quotable(config.resolve())}' out='{_quotable(out.resolve())}' "
            f"resume={'true' if resume else 'false'} audit='{audit_path}' overrides='{' '.join(overrides)}'"
        )
        return int(self.flwr_json("run", str(APP_DIR), CONNECTION, "--run-config", run_config)["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        run = self.flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"][0]
        return str(run["status"]), str(run.get("status-details", ""))

    def log(self, run_id: int) -> str:
        return self.flwr("log", str(run_id), CONNECTION, "--show").stdout


STATUS_EVERY_S = 10.0  # how often `deploy run` asks the SuperLink how the run is (each ask starts a `flwr` process)


def follow(
    connection: Connection, run_id: int, out: Path, since: float = 0.0, poll: float = 1.0, status_every: float = STATUS_EVERY_S
) -> tuple[str, str]:
    """Print the run's status changes and each metrics row as it lands; the final (status, details).

    Metrics rows are read from the run directory each ``poll`` seconds (when it is on this
    machine). The status is asked every ``status_every`` seconds, and every ``poll`` once the
    run has written its summary (after ``since``): each ask runs the ``flwr`` command, a
    Python process whose start-up costs a third of a core, which would otherwise slow the
    nodes training on the same machine.
    """
    seen, last, next_ask = 0, "", 0.0
    while True:
        seen = _print_new_rows(out / "metrics.jsonl", seen)
        if time.monotonic() >= next_ask or _finished_since(out, since):
            status, details = connection.status(run_id)
            if status != last:
                print(f"fedlpp: run {run_id}: {status}", flush=True)
                last = status
            if status.startswith(DONE):
                _print_new_rows(out / "metrics.jsonl", seen)
                return status, details
            next_ask = time.monotonic() + status_every
        time.sleep(poll)


def _finished_since(out: Path, since: float) -> bool:
    summary = out / "summary.json"
    return summary.is_file() and summary.stat().st_mtime >= since


def _print_new_rows(path: Path, seen: int) -> int:
    if not path.is_file():
        return seen
    lines = path.read_text().splitlines()
    for line in lines[seen:]:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # being written
            return seen
        shown = {k: row[k] for k in ("round", "clients", "train_loss", "failed", "epsilon") if k in row}
        if "global" in row:
            shown["global_loss"], shown["proxy_loss"] = row["global"]["loss"], row["proxy"]["loss"]
        print(f"fedlpp: {json.dumps(shown)}", flush=True)
        seen += 1
    return seen


# --- a whole federation on this machine (tests, benchmarks, trying it out) ------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class LocalDeployment:
    """A TLS SuperLink with node authentication and SuperNodes, all on 127.0.0.1, each in its own session.

    A context manager: leaving it stops every process it started (SIGTERM to each session,
    then SIGKILL), also when the body failed.
    """

    def __init__(self, directory: Path, nodes: int) -> None:
        self.directory = directory
        self.keys = make_keys(directory / "keys", nodes)
        self.ca = directory / "keys" / CA_CERT
        self.port = free_port()
        self.connection = Connection(f"{LOOPBACK}:{self.port}", self.ca)
        self.processes: list[subprocess.Popen] = []
        self._handles: list[psutil.Process] = []  # the same processes; psutil notices a reused pid
        self.node_ids: dict[int, int] = {}  # key index -> the node id the SuperLink gave it

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_superlink(self, timeout: float = 30) -> None:
        self._start(
            [
                "deploy",
                "superlink",
                "--keys",
                str(self.directory / "keys"),
                "--port",
                str(self.port),
                "--flwr-home",
                str(self.directory / "home-superlink"),
            ],
            "superlink",
        )
        context = ssl.create_default_context(cafile=str(self.ca))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"https://{LOOPBACK}:{self.port}/health", context=context, timeout=2)
                return
            except OSError:
                time.sleep(0.2)
        raise DeployError(f"the SuperLink did not answer on {LOOPBACK}:{self.port} within {timeout:g} s")

    def start_node(
        self,
        k: int,
        data: Path,
        client_id: int | None = None,
        register: bool = True,
        connect_timeout: float = 300,
        threads: int | None = None,
        launcher: Sequence[str] = FEDLPP_MODULE,
    ) -> subprocess.Popen:
        """SuperNode with key node-k on ``data``; ``register=False`` leaves its key unknown to the SuperLink.

        The nodes share this machine's cores: each trains with ``threads`` torch threads
        (default ``cores // nodes``, at least 1). ``launcher``: what Python runs with the
        ``fedlpp`` arguments (a test starts a modified node from a script of its own).
        """
        threads = threads or max(1, (os.cpu_count() or 1) // len(self.keys))
        if register:
            self.node_ids[k] = self.connection.register(self.keys[k].with_name(self.keys[k].name + ".pub"))
        args = [
            "deploy",
            "supernode",
            "--superlink",
            self.connection.superlink,
            "--ca",
            str(self.ca),
            "--key",
            str(self.keys[k]),
            "--data",
            str(data),
            "--port",
            str(free_port()),
            "--flwr-home",
            str(self.directory / f"home-node-{k}"),
            "--connect-timeout",
            f"{connect_timeout:g}",
            "--threads",
            str(threads),
        ]
        return self._start(args + (["--client-id", str(client_id)] if client_id is not None else []), f"node-{k}", launcher)

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def run_command(self, config: Path, out: Path, audit: Path | None = None) -> list[str]:
        """``fedlpp deploy run`` of ``config`` on this federation, as a command line."""
        command = [
            sys.executable,
            *FEDLPP_MODULE,
            "deploy",
            "run",
            "--superlink",
            self.connection.superlink,
            "--ca",
            str(self.ca),
        ]
        command += ["--config", str(config), "--out", str(out)]
        return command + (["--audit", str(audit)] if audit is not None else [])

    def _start(self, args: list[str], name: str, launcher: Sequence[str] = FEDLPP_MODULE) -> subprocess.Popen:
        with (self.directory / f"{name}.log").open("wb") as log:
            p = subprocess.Popen(
                [sys.executable, *launcher, *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=flower_env(),
            )
        self.processes.append(p)
        self._handles.append(psutil.Process(p.pid))
        return p

    def descendants(self) -> list[psutil.Process]:
        """Every live process started from here, children of children included (the SuperLink starts
        its SuperExec in a session of its own, so signalling the sessions alone would miss it)."""
        found = []
        for parent in self._handles:
            try:
                if parent.is_running():
                    found += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        return found

    def stop(self, grace: float = 10) -> None:
        tree = self.descendants()
        for p in self.processes:
            if p.poll() is None:  # a reaped leader's pid may belong to someone else by now
                _signal_session(p, signal.SIGTERM)
        for p in tree:
            _signal(p, signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=grace)
        for p in alive:
            _signal(p, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace)
        for p in self.processes:
            if p.poll() is None:
                _signal_session(p, signal.SIGKILL)
                p.wait(timeout=grace)
        self.processes.clear()
        self._handles.clear()


def _signal(p: psutil.Process, sig: int) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        p.send_signal(sig)


def _signal_session(p: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
