"""A warm node: Flower's SuperNode plus one long-lived fedlpp worker that serves every message it receives.

Flower 1.41 answers each message with a fresh ``flwr-clientapp`` process that pulls one task,
runs the app and exits (``flwr/supernode/runtime/run_clientapp.py``), so every message would
import torch and load the backbone and the node's data again. ``fedlpp deploy supernode``
instead starts the SuperNode with ``--isolation process`` (it then launches nothing itself)
and serves the SuperNode's Runtime (ClientAppIo) API from this process, in a loop: acquire
the next ClientApp task, pull its message and context, check the run is fedlpp's own app,
run fedlpp's ClientApp here (the model, tokenizer and data stay loaded between messages: the
caches in ``client_app.py``), push the reply and the context back. The protocol calls are
Flower's own (``pull_task_input``, ``push_message``, ``push_task_output``).

Trust: an open-source SuperLink cannot restrict which app a run carries (FAB signatures need
an enterprise licence). What protects the node is that the worker never installs or imports
code from a run's FAB: it runs only the installed ``fedlpp.engine.flower.client_app``, which
treats every message as data. It also refuses, with an error reply and before fetching the
message, a run whose app does not name itself fedlpp's (publisher, name, version and
components): a label check that catches a wrong submission, not an attacker, who can copy
the label. Only this worker may claim the SuperNode's tasks: the SuperNode is started with a
per-node secret (Flower's SuperExec authentication), so another local process cannot take
its messages and read its state (SecAgg keys, the input vector). The secret reaches the
SuperNode through a pipe (:func:`secret_pipe`), so no file ever holds it.

:class:`NodeProcess` is the supervisor around both: it validates the node's files before the
SuperNode starts, says in its own output why the SuperNode stopped (a key the SuperLink does
not know; a SuperLink it could not reach within ``--connect-timeout``), and stops the
SuperNode when it stops (Ctrl-C, SIGTERM, an error), so no Flower process outlives it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from fedlpp.engine.flower import FLOWER_ENV  # noqa: F401 - Flower's switches are set before flwr is imported

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2] / "assets" / "flower-app"
TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own name for a task executor's poll
DEFAULT_TASK_POLL_S = 0.1  # an idle warm worker looks for a task at least this often (Flower's SuperExec: 1 s)
FIRST_TASK_POLL_S = 0.01  # ... and this soon after it has served one
NOT_REGISTERED = "[code: 2004]"  # Flower 1.41's FLEET_NODE_ACTIVATION_FAILED: the SuperLink knows no node with this key
CONNECTION_FAILED = "Exit Code: 305"  # what flower-supernode prints when it cannot set up its connection to the SuperLink
MAX_PYPROJECT_BYTES = 1 << 20
GAVE_UP = "Giving up reconnection"  # ... and when it lost it later for longer than --max-wait-time


class NodeError(RuntimeError):
    """This node cannot go on; the message says why and what to do."""


# --- which app a run may carry ------------------------------------------------------------------------


@dataclass(frozen=True)
class AppIdentity:
    """What identifies fedlpp's Flower App: ``publisher/name``, version and its two components."""

    fab_id: str
    version: str
    components: dict[str, str]

    @staticmethod
    def of_pyproject(text: str) -> AppIdentity:
        tree = tomllib.loads(text)
        app = tree.get("tool", {}).get("flwr", {}).get("app", {})
        project = tree.get("project", {})
        return AppIdentity(
            f"{app.get('publisher', '')}/{project.get('name', '')}",
            str(project.get("version", "")),
            dict(app.get("components", {})),
        )


def fedlpp_app() -> AppIdentity:
    return AppIdentity.of_pyproject((APP_DIR / "pyproject.toml").read_text())


def check_app(fab_id: str, fab_version: str, fab_content: bytes, expected: AppIdentity) -> None:
    """Refuse (NodeError) a run whose app is not fedlpp's: this worker runs no other code."""
    if (fab_id, fab_version) != (expected.fab_id, expected.version):
        raise NodeError(
            f"this node runs only fedlpp's app {expected.fab_id} {expected.version}; the run carries "
            f"{fab_id or '?'} {fab_version or '?'}"
        )
    try:
        with zipfile.ZipFile(BytesIO(fab_content)) as fab:
            if fab.getinfo("pyproject.toml").file_size > MAX_PYPROJECT_BYTES:
                raise NodeError("the run's app bundle holds an oversized pyproject.toml; this node runs only fedlpp's app")
            shipped = AppIdentity.of_pyproject(fab.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise NodeError(f"the run's app bundle cannot be read ({e}); this node runs only fedlpp's app") from None
    if shipped != expected:
        raise NodeError(
            f"the run's app bundle names {shipped.fab_id} {shipped.version} with components {shipped.components}; "
            f"this node runs only fedlpp's ({expected.components})"
        )


# --- the worker: one task after another over the SuperNode's Runtime API --------------------------------


def task_poll_seconds(environ: Any = os.environ) -> float:
    """The worker's poll for tasks: Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (0.01 to 60 s) if set."""
    from fedlpp.engine.flower.polls import seconds_setting

    return seconds_setting(environ, TASK_POLL_ENV, DEFAULT_TASK_POLL_S, 60)


TASK_CALL_TIMEOUT_S = 120  # one call to the SuperNode's Runtime API about a task retries this long, then the task is dropped
AUTH_METHODS = frozenset({"/flwr.proto.Runtime/AcquireTask"})  # what the node's secret guards (Flower's SuperExec auth)


class TaskGone(RuntimeError):
    """The SuperNode no longer knows the task (it finished it itself, or the run stopped)."""


class Worker:
    """Serves the ClientApp tasks of one SuperNode, one at a time, with fedlpp's ClientApp loaded once.

    Only a holder of the node's secret may claim a task (Flower's SuperExec auth, HMAC over
    the request): another local process cannot take this node's messages and read its state.
    """

    def __init__(self, runtime_address: str, poll_s: float, auth_secret: bytes) -> None:
        from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient

        from fedlpp.engine.flower import pinned
        from fedlpp.engine.flower.client_app import app, prepare  # torch, transformers, peft: imported once

        pinned.shorten_pull_backoff()  # the SuperNode creates a task before its message's objects have all arrived

        self.address, self.poll_s, self.app, self.prepare = runtime_address, poll_s, app, prepare
        self.expected = fedlpp_app()
        self.served = 0
        auth = SuperExecAuthHttpInterceptor(master_secret=auth_secret, protected_methods=AUTH_METHODS)
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_address,
            insecure=True,
            root_certificates=None,
            interceptors=[*_interceptors(), auth],
            retry_invoker=_invoker(1, None),
        )

    def next_task(self) -> tuple[str, str] | None:
        """Claim the oldest pending task: (its token, its type), or None when there is none.

        AgentApp tasks are claimed too, only to be refused: nothing else would ever finish
        them, and the SuperNode would wait for their reply for good.
        """
        from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.constant import TaskType

        res = self._client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP, TaskType.AGENT_APP]))
        return (res.token, res.task.type) if res.HasField("task") and res.token else None

    def serve(self, token: str, task_type: Any) -> None:
        """Run one task: pull its message and context, answer it with fedlpp's ClientApp, push the reply and the context."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.constant import TaskType
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        invoker = _invoker(None, TASK_CALL_TIMEOUT_S)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[*_interceptors(), RuntimeTokenHttpInterceptor(token)],
            retry_invoker=invoker,
        )
        if task_type != TaskType.CLIENT_APP:
            log.error("refused an AgentApp task: this node runs only fedlpp's ClientApp")
            push_task_output(
                client=client, context=None, sub_status=SubStatus.FAILED, details="this node runs only fedlpp's ClientApp"
            )
            client.close()
            return
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "the task failed before its message was read"
        try:
            message, context = self._pull_input(client)
            start = time.perf_counter()
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            log.info("%s", answered(message.metadata.message_type, message.metadata.group_id, time.perf_counter() - start))
        except TaskGone as e:
            log.warning("the SuperNode dropped a task before it was answered (%s)", e)
        except KeyboardInterrupt:
            invoker.max_tries = 1  # stopping: the last calls get one try each, no waits
            raise
        except Exception as e:
            details = f"{type(e)}:<'{e}'>"
            log.error(
                "message %s: %s", message.metadata.message_type if message else "?", e, exc_info=not isinstance(e, NodeError)
            )
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as e:  # noqa: BLE001 - as Flower's ClientApp: logged; the server lists this client as silent
                log.error("could not hand the reply to the SuperNode: %s", e)
            finally:
                if heartbeat.is_running:
                    heartbeat.stop()
                push_task_output(client=client, context=context, sub_status=status, details=details)
                client.close()
        self.served += 1
        if status == SubStatus.COMPLETED and message is not None and context is not None:
            self._warm_up(message, context)

    def _pull_input(self, client: Any) -> tuple[Any, Any]:
        """The task's context and message, after checking its run is fedlpp's app (before any of the message is fetched).

        Flower's ``pull_task_input``, but the app is checked first, and a message the SuperNode
        has not stored yet (it creates the task first) is asked for again for a moment.
        """
        import httpx
        from flwr.app import Message
        from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
        from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
        from flwr.supercore.run import RunNotRunningException
        from flwr.supercore.task_identity import TaskIdentity

        try:
            res = client.PullTaskInput(PullTaskInputRequest())
            run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
            check_app(run.fab_id, run.fab_version, fab.content, self.expected)
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
            context = context_from_proto(res.context)
            deadline = time.monotonic() + 5
            while not (pulled := client.PullMessages(PullAppMessagesRequest())).messages_list:
                if time.monotonic() > deadline:
                    raise TaskGone("its message never reached the SuperNode's store")
                time.sleep(0.01)
        except (httpx.HTTPStatusError, RunNotRunningException) as e:
            raise TaskGone(str(e)) from None
        node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message does not carry its own id
        return message, context

    def _warm_up(self, message: Any, context: Any) -> None:
        """After the start-up query: the model and the data, loaded while the server prepares round 1."""
        try:
            self.prepare(message, context)
        except Exception as e:  # noqa: BLE001 - the first train message builds them again and reports the error to the server
            log.warning("could not load the model before the first round: %s", e)

    def close(self) -> None:
        self._client.close()


def _invoker(max_tries: int | None, max_time: float | None) -> Any:
    """Flower's HTTP retries without its SIGINT to this process on a 401 (which would stop a warm node for good):
    transient failures are retried (a few seconds apart at most) for ``max_time``; a refusal is raised at once."""
    import httpx
    from flwr.supercore.retry import RetryInvoker, exponential

    def give_up(exc: Exception) -> bool:
        return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code not in (502, 503, 504)

    return RetryInvoker(
        lambda: exponential(max_delay=2),
        (httpx.TransportError, httpx.HTTPStatusError),
        max_tries,
        max_time,
        should_giveup=give_up,
    )


def answered(message_type: str, group: str, seconds: float) -> str:
    """The log line for one message served (bench/engines.py reads it to split a round's time)."""
    return f"{message_type} message (round {group or '-'}) answered in {seconds:.3f} s"


ANSWERED = re.compile(r"(\S+) message \(round (\S+)\) answered in ([0-9.]+) s")


def _interceptors() -> list[Any]:
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor

    return [RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]


def _task_heartbeat(client: Any) -> Callable[[], bool]:
    """Flower's task heartbeat, minus its SIGINT to the process when the task is over (this process serves the next one)."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

    def beat() -> bool:
        try:
            return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)
        except httpx.HTTPError:
            return False

    return beat


# --- the supervisor: the SuperNode as a child, the worker in this process ------------------------------


class NodeProcess:
    """Runs one SuperNode (``fedlpp.engine.flower.supernode``, --isolation process) and its warm worker.

    ``run()`` returns the exit code: 0 after a clean stop (Ctrl-C, SIGTERM), non-zero with a
    message naming the cause when the SuperNode stopped by itself.
    """

    def __init__(
        self, supernode_args: Sequence[str], runtime_address: str, superlink: str, env: dict[str, str], connect_timeout: float
    ) -> None:
        self.supernode_args, self.runtime_address, self.superlink = list(supernode_args), runtime_address, superlink
        self.env, self.connect_timeout = env, connect_timeout
        self.tail: collections.deque[str] = collections.deque(maxlen=200)  # the SuperNode's last lines, for the diagnosis
        self.supernode: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()

    def run(self) -> int:
        logging.getLogger().setLevel(logging.WARNING)  # httpx would log every poll of the SuperNode
        logging.getLogger("fedlpp").setLevel(logging.INFO)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
        secret = os.urandom(32)
        try:
            with secret_pipe(secret) as (secret_path, secret_fd):
                self.supernode = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "fedlpp.engine.flower.supernode",
                        *self.supernode_args,
                        "--superexec-auth-secret-file",
                        secret_path,
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    pass_fds=(secret_fd,),
                    preexec_fn=_die_with_parent,
                )
            self._relay_thread = threading.Thread(target=self._relay, args=(self.supernode.stdout,), daemon=True)
            self._relay_thread.start()
            worker = Worker(self.runtime_address, task_poll_seconds(self.env), secret)
            try:
                return self._loop(worker)
            finally:
                worker.close()
        except KeyboardInterrupt:
            print("fedlpp node: stopping", flush=True)
            return 0
        finally:
            for s, handler in previous.items():  # a second signal must not cut the SuperNode's stop short
                signal.signal(s, handler)
            self._stop_supernode()

    def _loop(self, worker: Worker) -> int:
        import httpx

        from fedlpp.engine.flower.polls import IdlePoll

        idle = IdlePoll(FIRST_TASK_POLL_S, worker.poll_s)
        while not self._stop.is_set():
            assert self.supernode is not None
            if self.supernode.poll() is not None:
                return self._diagnose(self.supernode.returncode)
            try:
                task = worker.next_task()
            except httpx.HTTPError:  # the SuperNode's local API is not up yet, or going down
                task = None
            if task is None:
                time.sleep(idle.next())
                continue
            worker.serve(*task)
            idle.reset()
        print("fedlpp node: stopping (signal)", flush=True)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stop.set()
        raise KeyboardInterrupt  # leaves a training step at once; run() stops the SuperNode

    def _relay(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace")
            self.tail.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    def _diagnose(self, code: int) -> int:
        self._relay_thread.join(timeout=5)  # the SuperNode's last lines first (the relay ends with its output)
        said = "".join(self.tail)
        if NOT_REGISTERED in said:
            print(
                f"fedlpp node: this node's public key is not registered with the SuperLink at {self.superlink} "
                "(or another node with the same key is connected): ask the model owner to run "
                "`fedlpp deploy register <this node's .pub>`",
                flush=True,
            )
        elif CONNECTION_FAILED in said or GAVE_UP in said:
            print(
                f"fedlpp node: could not reach the SuperLink at {self.superlink} within --connect-timeout="
                f"{self.connect_timeout:g} s (is it running, and are the address and port right?); giving up",
                flush=True,
            )
        else:
            print(f"fedlpp node: the SuperNode stopped with exit code {code}; its last lines are above", flush=True)
        return code or 1

    def _stop_supernode(self, grace: float = 10) -> None:
        if self.supernode is None or self.supernode.poll() is not None:
            return
        self.supernode.terminate()
        try:
            self.supernode.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.supernode.kill()
            self.supernode.wait(timeout=grace)


@contextlib.contextmanager
def secret_pipe(secret: bytes) -> Iterator[tuple[str, int]]:
    """A path a child process reads ``secret`` from once, and the descriptor to pass it (``pass_fds``).

    The secret goes through a pipe (``/dev/fd/N``, Linux and macOS), never a file: nothing of it
    is left on disk, also when the node is killed. The SuperNode reads its
    ``--superexec-auth-secret-file`` once, at its start. Leaving the block closes this process's
    end; the child keeps its own copy of the descriptor.
    """
    if len(secret) > select.PIPE_BUF:
        raise ValueError(f"a secret of {len(secret)} bytes does not fit one pipe write ({select.PIPE_BUF})")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, secret)
        os.close(write_end)
        write_end = -1
        yield f"/dev/fd/{read_end}", read_end
    finally:
        os.close(read_end)
        if write_end != -1:
            os.close(write_end)


def _die_with_parent() -> None:
    """In the SuperNode's process (Linux): a SIGTERM when the node's supervisor dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
