"""`amxtune-train launch`: start this node's ranks of a subcommand, like a static torchrun.

    amxtune-train launch --nnodes 2 --node-rank 0 --nproc-per-node 4 \\
        --master-addr HOST --master-port 29500 -- textual-inversion --config job.json

Each rank is `python -m amxtune_trainer SUBCOMMAND ...` with RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; the ranks rendezvous themselves
(distributed.init, env://), as under mpirun. Why not torchrun: its elastic agent restarts and
re-rendezvous nothing here (the operator restarts the whole group), and it ends every failure
with its own traceback and an error box, and exits 1 whatever the rank's exit code was. This
launcher prints one line instead (the rank's own line is just above it) and exits with the
first failing rank's code, which the operator reads (amxtune_api.events).

Signals: SIGINT/SIGTERM are passed on to every rank once; the ranks end their current step and
save a checkpoint of it (textual_inversion), and those that outlive a grace period are killed.
The ranks die with the launcher (PR_SET_PDEATHSIG), so nothing is left behind; neither is the
folder of this launch where the ranks share the frozen weights (frozen.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

GRACE_SECONDS = 10.0  # how long ranks may take to stop once a peer failed
# ... and once told to stop: a step plus a checkpoint, within Kubernetes' default 30 s
# terminationGracePeriodSeconds
STOP_GRACE_SECONDS = 25.0
POLL_SECONDS = 0.2


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.usage = (f"{parser.prog} [--nnodes N --node-rank R --master-addr HOST "
                    "--master-port PORT] [--nproc-per-node P] -- SUBCOMMAND [ARGS ...]")
    parser.add_argument("--nnodes", type=int, default=1, help="worker nodes (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index (default 0)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="ranks on this node (default 1)")
    parser.add_argument("--master-addr", default=None,
                        help="rank 0's host (default $MASTER_ADDR, or 127.0.0.1 on one node)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="rank 0's rendezvous port (default $MASTER_PORT; on one node a "
                        "free port)")
    parser.add_argument("--log-dir", default=None,
                        help="folder for each failing rank's traceback (rank-N.log); "
                        "default $AMXTUNE_LOG_DIR, else tracebacks go to stderr")
    parser.add_argument("rank_command", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ...")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def rank_environments(args: argparse.Namespace, base: dict[str, str]) -> list[dict[str, str]]:
    from amxtune_trainer.errors import UserError

    if args.nnodes < 1 or args.nproc_per_node < 1:
        raise UserError("--nnodes and --nproc-per-node must be at least 1")
    if not 0 <= args.node_rank < args.nnodes:
        raise UserError(f"--node-rank {args.node_rank} is outside 0..{args.nnodes - 1}")
    addr = args.master_addr or base.get("MASTER_ADDR")
    port = args.master_port or base.get("MASTER_PORT")
    if args.nnodes == 1:
        addr = addr or "127.0.0.1"
        port = port or _free_port()
    elif not addr or not port:
        raise UserError(f"{args.nnodes} nodes need --master-addr and --master-port "
                        "(or MASTER_ADDR and MASTER_PORT)")
    world = args.nnodes * args.nproc_per_node
    log_dir = args.log_dir or base.get("AMXTUNE_LOG_DIR")
    envs = []
    for local in range(args.nproc_per_node):
        env = dict(base, RANK=str(args.node_rank * args.nproc_per_node + local),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                   LOCAL_WORLD_SIZE=str(args.nproc_per_node), GROUP_RANK=str(args.node_rank),
                   MASTER_ADDR=str(addr), MASTER_PORT=str(port))
        if log_dir:
            env["AMXTUNE_LOG_DIR"] = log_dir
        envs.append(env)
    return envs


class Ranks:
    """The rank processes of this node, stopped together."""

    def __init__(self, command: list[str], envs: list[dict[str, str]]) -> None:
        self.processes = [
            subprocess.Popen([sys.executable, "-m", "amxtune_trainer", *command], env=env,
                             process_group=0, preexec_fn=_die_with_parent)
            for env in envs
        ]
        self.stop_requested: int | None = None

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signum)

    def wait_all(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(POLL_SECONDS)

    def stop(self, first_signal: int) -> None:
        self.signal_all(first_signal)
        self.wait_all(GRACE_SECONDS)
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()


def exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
    from amxtune_trainer.errors import UserError

    command = list(args.rank_command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise UserError("name the subcommand to launch after --, e.g. "
                        "`amxtune-train launch --nproc-per-node 2 -- textual-inversion ...`")
    envs = rank_environments(args, dict(os.environ))
    store = frozen_store(envs) if args.nproc_per_node > 1 else None
    try:
        return _run_ranks(args, command, envs)
    finally:
        if store is not None:  # what a killed rank left behind goes too
            shutil.rmtree(store, ignore_errors=True)


def frozen_store(envs: list[dict[str, str]]) -> str | None:
    """A folder of this launch's own for the frozen weights the ranks share (frozen.py),
    inside $AMXTUNE_FROZEN_WEIGHTS_DIR or the temp folder: private to this user, not shared
    with another job's ranks, removed when the ranks have exited."""
    from amxtune_trainer import frozen

    base = envs[0].get(frozen.DIR_ENV) or None
    try:
        store = tempfile.mkdtemp(prefix="amxtune-launch-", dir=base)
    except OSError:
        return None  # the ranks find the same and keep private copies, with a notice
    for env in envs:
        env[frozen.DIR_ENV] = store
    return store


def _run_ranks(args: argparse.Namespace, command: list[str], envs: list[dict[str, str]]) -> int:
    first_rank = args.node_rank * args.nproc_per_node
    ranks = Ranks(command, envs)

    def on_signal(signum, _frame):
        if ranks.stop_requested is None:
            ranks.stop_requested = signum
            ranks.signal_all(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    first = None
    while ranks.stop_requested is None:
        codes = [p.poll() for p in ranks.processes]
        first = next((code for code in codes if code not in (None, 0)), None)
        if first is not None or all(code == 0 for code in codes):
            break
        time.sleep(POLL_SECONDS)
    if ranks.stop_requested is not None:
        ranks.wait_all(STOP_GRACE_SECONDS)
        ranks.stop(signal.SIGKILL)
        codes = [exit_code(p.returncode) for p in ranks.processes]
        return next((c for c in codes if c), 128 + ranks.stop_requested)
    if first is None:
        return 0
    ranks.wait_all(GRACE_SECONDS / 2)  # peers failing the same way report it themselves
    failed = {first_rank + i: exit_code(p.returncode) for i, p in enumerate(ranks.processes)
              if p.poll() not in (None, 0)}
    running = sum(p.poll() is None for p in ranks.processes)
    ranks.stop(signal.SIGTERM)
    who = ("rank " if len(failed) == 1 else "ranks ") + ", ".join(map(str, failed))
    codes_seen = sorted(set(failed.values()))
    what = (f"code {codes_seen[0]}" if len(codes_seen) == 1
            else "codes " + ", ".join(map(str, failed.values())))
    stopped = f"; stopped {running} other rank(s)" if running else ""
    print(f"amxtune-train launch: {who} exited with {what}{stopped}", file=sys.stderr,
          flush=True)
    return exit_code(first)
