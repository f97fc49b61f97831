"""``fedlpp partition`` and ``fedlpp deploy ...``: the commands of a real Flower deployment.

fedlpp partition --config E.toml --out parts/        each client's examples as parts/client-K.jsonl
fedlpp deploy keys keys/                              a test CA and the SuperLink's TLS certificate and key
fedlpp deploy node-key my-node                        a client's own key pair (only my-node.pub travels)
fedlpp deploy superlink --keys keys/                  the SuperLink: TLS, node authentication
fedlpp deploy register keys/node-0.pub ...            allow one node's key
fedlpp deploy supernode --key keys/node-0 --data parts/client-0.jsonl ...
fedlpp deploy run --config E.toml --out runs/x ...    submit the experiment and follow it to the end
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from fedlpp.config import load_config
from fedlpp.rundir import resumed_config

DEFAULT_SUPERLINK = "127.0.0.1:8000"


def add_commands(sub: argparse._SubParsersAction) -> None:
    part = sub.add_parser("partition", help="write each client's examples as DIR/client-K.jsonl (the data a SuperNode reads)")
    part.add_argument("overrides", nargs="*", metavar="section.key=value")
    part.add_argument("--config", type=Path, help="TOML experiment file")
    part.add_argument("--out", type=Path, required=True, help="folder for client-K.jsonl (must not hold any yet)")
    deploy = sub.add_parser("deploy", help="a real deployment on Flower: keys, SuperLink, SuperNodes, run")
    steps = deploy.add_subparsers(dest="step", required=True)
    keys = steps.add_parser("keys", help="a test CA and the SuperLink's TLS certificate and key (and node keys for a test)")
    keys.add_argument("dir", type=Path)
    keys.add_argument("--nodes", type=int, default=0, help="also make this many node key pairs here (a test on one machine)")
    keys.add_argument("--host", action="append", default=[], help="another name or IP the certificate is valid for (repeat)")
    node_key = steps.add_parser("node-key", help="a client's own ECDSA key pair: PATH (private, 0600) and PATH.pub")
    node_key.add_argument("path", type=Path)
    link = steps.add_parser("superlink", help="start the SuperLink (TLS, node authentication) in the foreground")
    link.add_argument("--keys", type=Path, required=True, help="folder with ca.crt, server.pem, server.key")
    link.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for remote nodes)")
    link.add_argument("--port", type=int, default=8000, help="its one HTTPS endpoint: Fleet, Control and ServerApp APIs")
    link.add_argument("--flwr-home", type=Path, help="Flower's state and app folder (default: Flower's ~/.flwr)")
    register = steps.add_parser("register", help="allow a node's public key to connect")
    register.add_argument("public_key", type=Path)
    _connection_args(register)
    node = steps.add_parser("supernode", help="check this node's data file, then start its SuperNode in the foreground")
    _connection_args(node)
    node.add_argument("--key", type=Path, required=True, help="this node's private key (its .pub must be registered)")
    node.add_argument("--data", type=Path, required=True, help="this node's own examples (JSONL, see fedlpp partition)")
    node.add_argument("--client-id", type=int, help="this node's client index (default: the server assigns one)")
    node.add_argument("--host", default="127.0.0.1", help="interface of the node's local API")
    node.add_argument("--port", type=int, default=9094, help="the node's local API port (each node on a machine needs its own)")
    node.add_argument("--flwr-home", type=Path, help="Flower's folder for this node (one per node on a machine)")
    node.add_argument(
        "--connect-timeout",
        type=float,
        default=300,
        help="give up after this many seconds without reaching the SuperLink (default 300)",
    )
    node.add_argument("--threads", type=int, help="torch threads for training (default: torch's, one per core)")
    node.add_argument(
        "--min-noise-multiplier",
        type=float,
        default=0.0,
        help="refuse rounds whose DP noise (added by this node) is below this multiplier (default: no minimum)",
    )
    node.add_argument("--max-clip-norm", type=float, default=0.0, help="refuse rounds that clip above this norm (default: none)")
    node.add_argument("--require-secagg", action="store_true", help="refuse rounds without secure aggregation")
    node.add_argument(
        "--max-epsilon",
        type=float,
        default=0.0,
        help="this node's own DP-SGD budget for a run: refuse the round that would take its epsilon past it (default: none)",
    )
    run = steps.add_parser("run", help="submit an experiment to the SuperLink and follow it to its end")
    run.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="applied on the server; with --resume only the keys a resume may change (fl.rounds=N extends the run)",
    )
    _connection_args(run)
    run.add_argument(
        "--config",
        type=Path,
        required=True,
        help="the experiment TOML, a path on the server (absolute when submitting from another machine)",
    )
    run.add_argument("--out", type=Path, required=True, help="the run directory the ServerApp writes (on the server)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--audit", type=Path, help="also write every message the ServerApp sends into this folder")
    run.add_argument("--no-wait", action="store_true", help="submit and return the run id")


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", default=DEFAULT_SUPERLINK, help="host:port of the SuperLink")
    parser.add_argument("--ca", type=Path, required=True, help="the CA certificate of the SuperLink's TLS certificate")


def command_partition(args: argparse.Namespace) -> int:
    from fedlpp.data.examples_file import write_examples
    from fedlpp.engine.setup import client_partitions, load_task_data

    cfg = load_config(args.config, args.overrides)
    existing = sorted(args.out.glob("client-*.jsonl")) if args.out.is_dir() else []
    if existing:
        raise FileExistsError(f"{args.out} already holds {existing[0].name}; choose an empty folder")
    args.out.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(client_partitions(cfg, load_task_data(cfg))):
        write_examples(args.out / f"client-{k}.jsonl", part)
        print(f"{args.out / f'client-{k}.jsonl'}: {len(part)} examples")
    return 0


def command_deploy(args: argparse.Namespace) -> int:
    from fedlpp.engine.flower import deploy

    if args.step == "keys":
        nodes = deploy.make_keys(args.dir, args.nodes, args.host)
        print(
            f"{args.dir}: ca.crt (give it to every client), server.pem, server.key (the SuperLink's)"
            + "".join(f", {n.name} + {n.name}.pub" for n in nodes)
        )
        return 0
    if args.step == "node-key":
        deploy.make_node_key(args.path)
        print(f"{args.path} (private: keep it on this machine), {args.path}.pub (send it to the model owner to register)")
        return 0
    if args.step == "superlink":
        deploy.exec_program(deploy.superlink_command(args.keys, args.host, args.port), args.flwr_home)
    connection = deploy.Connection(args.superlink, args.ca)
    if args.step == "register":
        print(f"registered {args.public_key}: node id {connection.register(args.public_key)}")
        return 0
    if args.step == "supernode":
        policy = {
            "min-noise-multiplier": args.min_noise_multiplier,
            "max-clip-norm": args.max_clip_norm,
            "max-epsilon": args.max_epsilon,
        }
        node_args = deploy.supernode_args(
            args.superlink,
            args.ca,
            args.key,
            args.data,
            args.client_id,
            args.host,
            args.port,
            args.connect_timeout,
            {**policy, "require-secagg": args.require_secagg},
        )
        return deploy.run_node(
            node_args, args.host, args.port, args.superlink, args.connect_timeout, args.flwr_home, args.threads
        )
    return command_deploy_run(deploy, connection, args)


def command_deploy_run(deploy, connection, args: argparse.Namespace) -> int:
    # On the server's machine the files are here: refuse a bad experiment or resume now, not in the ServerApp.
    if args.resume and (args.out / "config.toml").is_file():
        resumed_config(args.out, args.overrides)
    elif not args.resume and args.config.is_file():
        load_config(args.config, args.overrides)
    submitted = time.time()
    run_id = connection.submit(args.config, args.out, args.resume, args.audit, args.overrides)
    print(f"fedlpp: submitted run {run_id}; the ServerApp writes {args.out.resolve()}", flush=True)
    if args.no_wait:
        return 0
    status, details = deploy.follow(connection, run_id, args.out, since=submitted)
    if status != "finished:completed":
        print(f"fedlpp: run {run_id} ended {status}: {details}\n{connection.log(run_id)[-4000:]}")
        return 1
    summary_file = args.out / "summary.json"
    if not summary_file.is_file() or summary_file.stat().st_mtime < submitted:  # submitted from another machine
        print(
            f"fedlpp: run {run_id} completed; its run directory {args.out} is on the server's machine\n"
            f"{connection.log(run_id)[-2000:]}"
        )
        return 0
    from fedlpp.evaluation.report import format_summary, report_files, run_directory_line

    print(format_summary(json.loads(summary_file.read_text())))
    print("\n" + run_directory_line(args.out, report_files(args.out)))
    return 0
