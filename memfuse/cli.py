"""The `memfuse` command: mount, status, list, umount and service.

`memfuse mount AGENT_ID [MOUNTPOINT]` starts the daemon in the background and returns once the
mount is ready (or prints why it could not start); `--foreground` serves in this process.
`memfuse mount --all [--tag TAG ...]` does so for every agent on the server (many.py).
`memfuse status [AGENT_ID|MOUNTPOINT]` reports what a mount is doing; `memfuse list` one line
per mount.
`memfuse umount AGENT_ID|MOUNTPOINT|--all` asks the daemon(s) to flush, snapshot and unmount,
and waits.
`memfuse service install AGENT_ID|--all` installs the systemd user unit (service.py).
`memfuse serve [--listen HOST:PORT]` serves the agents' histories over git's smart HTTP in the
foreground (gitserve.py).
`memfuse git-memory enable|disable AGENT_ID` moves an agent to Letta's git-memory model on a
stock server and back (gitmemory.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Callable
from functools import partial
from pathlib import Path

import trio

from . import gitmemory, gitserve, locate, many, mounttable, procs, service
from .config import (AGENT_PLACEHOLDER, DEFAULT_BASE_URL, GIT_REMOTE_ENV, Config, ConfigError,
                     check_agent_id, private_dir)
from .daemon import MountError, answers, clear_dead_mount, serve
from .errors import ServerCallError
from .gitremote import GitRemote, RemoteError
from .journal import Journal
from .remote import CONFLICT_POLICIES, Remote, make_client
from .status import Status
from .writerlock import WriterLock

READY = "ready"    # the ready pipe's last line: "ready", or "error <why>"
NOTICE = "notice"  # lines before it: "notice <sentence>" (a local-first mount says so)
PROGRESS = "progress"  # and "progress <sentence>" while a large memory loads, shown at once


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memfuse", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    mount = sub.add_parser("mount", help="mount an agent's memory (or every agent's: --all)")
    mount.add_argument("agent_id", nargs="?", help="the agent, e.g. agent-1234...")
    mount.add_argument("mountpoint", nargs="?",
                       help="where to mount (default ~/.letta/agents/AGENT_ID/memory)")
    _add_selection(mount, "mount every agent on the server at its default mountpoint, one "
                          "daemon each, skipping those mounted already")
    mount.add_argument("--base-url", help="Letta server (default $LETTA_BASE_URL or "
                                          "http://localhost:8283)")
    mount.add_argument("--history-dir", help="history repository (default "
                                             "~/.letta/agents/AGENT_ID/memory.git)")
    mount.add_argument("--revalidate", type=float, default=1.0, metavar="SECONDS",
                       help="re-read a block from the server on open when the cached copy is "
                            "older than this (default 1)")
    mount.add_argument("--poll-interval", type=float, default=0.5, metavar="SECONDS",
                       help="how often to list the attached blocks for server-side changes "
                            "(default 0.5)")
    mount.add_argument("--full-poll-interval", type=float, default=3.0, metavar="SECONDS",
                       help="how often to list all the agent's blocks, at least: it grows to "
                            "5 times what a listing takes (default 3)")
    mount.add_argument("--on-conflict", choices=CONFLICT_POLICIES, default="overwrite",
                       help="when a file is written after the server changed its block since "
                            "the file was opened: overwrite (the file wins; default) or reject "
                            "(close fails with ESTALE); either way both versions are in history")
    mount.add_argument("--git-remote", metavar="URL",
                       help="push the history to this git remote after each snapshot: a path "
                            "to a bare repository, file://, git:// or http(s):// (default "
                            "$MEMFUSE_GIT_REMOTE; credentials in it are never logged or "
                            "written to disk). A token in a URL given here is visible to other "
                            "users in ps (with --foreground, for the whole mount) and stays "
                            "in your shell's history: put it in MEMFUSE_GIT_REMOTE or a git "
                            "credential helper instead")
    mount.add_argument("--foreground", action="store_true", help="serve in this process")
    mount.add_argument("--debug", action="store_true", help="log every server call")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    serve = sub.add_parser(
        "serve", help="serve the agents' histories over git's smart HTTP at "
                      "/v1/git/AGENT_ID/state.git (clone, fetch, pull: letta-code's memfs), "
                      "in the foreground")
    serve.add_argument("--listen", default=gitserve.DEFAULT_LISTEN, metavar="HOST:PORT",
                       help=f"where to listen (default {gitserve.DEFAULT_LISTEN}; port 0: a "
                            f"free one, printed)")
    serve.add_argument("--base-url", help="Letta server (default $LETTA_BASE_URL or "
                                          "http://localhost:8283)")
    serve.add_argument("--insecure", action="store_true",
                       help="listen on an address other than loopback although git's Basic "
                            "authorization then carries the API keys in clear text (no TLS "
                            "here: put a TLS proxy in front)")
    serve.add_argument("--debug", action="store_true", help="log every server call")

    status = sub.add_parser("status", help="what a running mount is doing")
    status.add_argument("target", nargs="?", help="AGENT_ID or MOUNTPOINT (default: every mount)")

    sub.add_parser("list", help="one line per mount: agent, name, mountpoint, server, state, "
                                "pending work")

    umount = sub.add_parser("umount", help="flush, snapshot and unmount")
    umount.add_argument("target", nargs="?", help="AGENT_ID or MOUNTPOINT")
    umount.add_argument("--all", action="store_true",
                        help="unmount every mount here (each flushed and snapshotted; at once)")
    umount.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long to wait for the daemon(s) to finish (default 60)")

    _add_git_memory(sub)

    svc = sub.add_parser("service", help="start mounts at login with systemd (user units)")
    svc_sub = svc.add_subparsers(dest="service_command", required=True)
    install = svc_sub.add_parser(
        "install", help=f"write {service.TEMPLATE} to the systemd user unit directory and "
                        f"enable memfuse@AGENT_ID.service, or print the commands that would")
    install.add_argument("agent_id", nargs="?", help="the agent, e.g. agent-1234...")
    _add_selection(install, "an instance for every agent on the server")
    install.add_argument("--base-url", help="Letta server to list agents from with --all "
                                            "(default $LETTA_BASE_URL or http://localhost:8283)")
    install.add_argument("--no-enable", action="store_true",
                         help="write the unit only; print the systemctl commands")
    install.add_argument("--serve", action="store_true",
                         help=f"instead: write and enable {service.SERVE_UNIT}, which runs "
                              f"`memfuse serve` at login")
    install.add_argument("--listen", default=gitserve.DEFAULT_LISTEN, metavar="HOST:PORT",
                         help=f"with --serve: where it listens (default "
                              f"{gitserve.DEFAULT_LISTEN})")
    install.add_argument("--insecure", action="store_true",
                         help="with --serve: as `memfuse serve --insecure`")
    return parser


def _add_git_memory(sub) -> None:
    gm = sub.add_parser("git-memory", help="move an agent to Letta's git-memory model on a "
                                           "stock server, as Letta Cloud does, and back")
    gm_sub = gm.add_subparsers(dest="git_memory_command", required=True)
    enable = gm_sub.add_parser(
        "enable", help="prefix system/ to every attached label that lacks it (the prompt keeps "
                       "them), tag the agent git-memory-enabled, attach its owned detached "
                       "blocks (files, out of the prompt); recorded for disable; idempotent")
    enable.add_argument("--include-shared", action="append", default=[], metavar="LABEL",
                        help="rename the attached block LABEL although other agents have it "
                             "attached too (their label changes as well); repeated for several")
    enable.add_argument("--dry-run", action="store_true", help="say what would be done only")
    disable = gm_sub.add_parser("disable", help="undo what enable did (detach, untag, rename "
                                                "back), where the blocks are as it left them")
    for parser in (enable, disable):
        parser.add_argument("agent_id", help="the agent, e.g. agent-1234...")
        parser.add_argument("--base-url", help="Letta server (default $LETTA_BASE_URL or "
                                               "http://localhost:8283)")


def _add_selection(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--all", action="store_true", help=what)
    parser.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="with --all: only agents having this tag; repeated, agents having "
                             "ALL the tags (each --tag narrows the set, so a mistyped or extra "
                             "tag selects fewer agents, never more)")


def _check_selection(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     command: str) -> None:
    """AGENT_ID or --all, not both; --tag only with --all (else usage error, exit 2)."""
    if args.all == (args.agent_id is not None):
        parser.error(f"{command}: give an AGENT_ID or --all")
    if args.tag and not args.all:
        parser.error(f"{command}: --tag selects agents for --all")


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # httpx logs every request at INFO (shown with --debug); httpcore's wire chatter never.
    logging.getLogger("httpx").setLevel(logging.INFO if debug else logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # a push's libraries: dulwich's chatter, and urllib3's WARNING per connection retry (the
    # pusher logs one line per outage itself)
    logging.getLogger("dulwich").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)


def _mount_foreground(config: Config, ready_fd: int | None) -> int:
    _setup_logging(config.debug)

    def on_ready(error: str | None) -> None:
        if ready_fd is not None:
            os.write(ready_fd, (f"error {error}" if error else READY).encode() + b"\n")
            os.close(ready_fd)
        elif error is None:
            print(f"memfuse: serving agent {config.agent_id} at {config.mountpoint} "
                  f"(Ctrl-C to unmount)", file=sys.stderr)

    def on_notice(text: str, kind: str = NOTICE) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, f"{kind} {text}\n".encode())
            except OSError:  # `memfuse mount` gave up waiting: the daemon goes on loading
                pass
        else:
            print(f"memfuse: {text}", file=sys.stderr)

    try:
        trio.run(partial(serve, config, on_ready, on_notice=on_notice,
                         on_progress=partial(on_notice, kind=PROGRESS)))
    except MountError as exc:
        logging.getLogger("memfuse").error("%s", exc)
        return 1
    return 0


def _mount_background(args: argparse.Namespace, config: Config) -> int:
    """Start `memfuse mount --foreground` detached, logging to the agent's log file, and wait
    for its report on a pipe (notices go to stderr)."""
    notices, error = _launch(config, args.debug)
    for notice in notices:
        print(f"memfuse: {notice}", file=sys.stderr)
    if error is None:
        print(f"memfuse: mounted agent {config.agent_id} at {config.mountpoint}")
        return 0
    print(f"memfuse: {error}", file=sys.stderr)
    return 1


def _launch(config: Config, debug: bool) -> tuple[list[str], str | None]:
    """Start the daemon for `config` detached (`memfuse mount --foreground`, logging to the
    agent's log file) and wait for its report on a pipe: (notices, None) once the mount is
    ready, (notices, why) when it did not start (`why` names the log). Safe to call from
    several threads at once: each daemon gets its own pipe (fds are not inherited otherwise)."""
    private_dir(config.state_dir)
    read_fd, write_fd = os.pipe()
    argv = [sys.executable, "-m", "memfuse.cli", "mount", config.agent_id, str(config.mountpoint),
            "--foreground", "--ready-fd", str(write_fd), "--base-url", config.base_url,
            "--history-dir", str(config.history_dir), "--revalidate", str(config.revalidate),
            "--poll-interval", str(config.poll_interval),
            "--full-poll-interval", str(config.full_poll_interval),
            "--on-conflict", config.on_conflict]
    if debug:
        argv.append("--debug")
    env = {k: v for k, v in os.environ.items() if k != GIT_REMOTE_ENV}
    if config.git_remote:  # through the environment: argv is readable by every user
        env[GIT_REMOTE_ENV] = config.git_remote
    log_fd = os.open(config.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(log_fd, 0o600)  # the log names files and blocks: the user's alone
    with os.fdopen(log_fd, "ab") as log_file:
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                         pass_fds=(write_fd,), start_new_session=True, env=env)
    os.close(write_fd)
    try:
        lines = _read_report(read_fd, 180)
    finally:
        os.close(read_fd)
    line = lines[-1] if lines else ""
    notices = [notice.removeprefix(NOTICE + " ") for notice in lines[:-1]]
    if line == READY:
        return notices, None
    reason = line.removeprefix("error ") if line else "the daemon exited during start-up"
    return notices, f"{reason} (log: {config.log_file})"


def _selected_agents(args: argparse.Namespace) -> tuple[list[many.Agent], str]:
    """The agents `--all [--tag ...]` names on the server (`--base-url`, else LETTA_BASE_URL,
    else the default) and the words saying where they come from. Raises ServerCallError."""
    base_url = args.base_url or os.environ.get("LETTA_BASE_URL") or DEFAULT_BASE_URL
    agents = trio.run(partial(many.server_agents, base_url,
                              os.environ.get("LETTA_API_KEY") or None, args.tag))
    where = f"on {base_url}" + (f" with the tag(s) {', '.join(args.tag)}" if args.tag else "")
    return agents, where


def _mount_all(args: argparse.Namespace, git_remote: str | None) -> int:
    """`memfuse mount --all`: every selected agent at its default mountpoint, one daemon each,
    started side by side; the flags of `mount` apply to each, and `git_remote` (holding
    AGENT_PLACEHOLDER) names each agent's own remote."""
    try:
        agents, where = _selected_agents(args)
    except ServerCallError as exc:
        print(f"memfuse: could not list the agents: {exc.failure}", file=sys.stderr)
        return 1

    def launch(agent: many.Agent) -> many.Launched:
        config = _config(args, agent.id, git_remote=git_remote)
        notices, error = _launch(config, args.debug)
        return many.Launched(agent, error, tuple(notices))

    launched, skipped = many.mount_all(agents, launch)
    lines, code = many.mount_report(launched, skipped, where)
    for line in lines:
        print(f"memfuse: {line}", file=sys.stderr if line.startswith("FAILED") else sys.stdout)
    return code


def _config(args: argparse.Namespace, agent_id: str, mountpoint: str | None = None,
            git_remote: str | None = None) -> Config:
    """The mount's Config from `mount`'s flags. git_remote: the URL (AGENT_PLACEHOLDER becomes
    `agent_id`; a path is made absolute). Raises ConfigError, RemoteError."""
    config = Config.build(agent_id, mountpoint, base_url=args.base_url,
                          history_dir=args.history_dir,
                          revalidate=args.revalidate, poll_interval=args.poll_interval,
                          full_poll_interval=args.full_poll_interval,
                          on_conflict=args.on_conflict, debug=args.debug,
                          git_remote=git_remote)
    if config.git_remote:
        config.git_remote = GitRemote(config.git_remote).url
    return config


def _read_report(fd: int, timeout: float) -> list[str]:
    """The lines the daemon writes on its ready pipe `fd`: any `notice` lines, then `ready` or
    `error <why>` (the last line; "" when the daemon exited without one), waiting at most
    `timeout` seconds. `progress` lines are printed on stderr as they come, not returned."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        *raw, rest = data.split(b"\n")  # `rest`: a line not complete yet, kept as bytes
        complete = [line.decode(errors="replace").strip() for line in raw]
        for line in complete:
            if line.startswith(PROGRESS + " "):
                print(f"memfuse: {line.removeprefix(PROGRESS + ' ')}", file=sys.stderr,
                      flush=True)
        kept = [r for r, line in zip(raw, complete) if not line.startswith(PROGRESS + " ")]
        complete = [line for line in complete if not line.startswith(PROGRESS + " ")]
        data = b"\n".join(kept + [rest])
        if complete and not complete[-1].startswith(NOTICE + " "):
            return complete
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return complete + [f"error the daemon did not report in {timeout:g} s"]
        chunk = os.read(fd, 4096)
        if not chunk:  # the daemon exited
            return complete + [rest.decode(errors="replace").strip()]
        data += chunk


def umount(target: str | None, timeout: float) -> int:
    """Stop the daemon serving `target` (an agent id, or a mountpoint path whoever mounted it:
    locate.find) with SIGTERM and wait, clearing the mount a dead daemon left; with `target`
    None, every mount that has a pid file here (`umount --all`): all the daemons are signalled
    first, so they flush and snapshot at the same time, then each is waited for (within
    `timeout` seconds in all) and reported. Another user's mount is refused, naming its owner
    (root stops its daemon like its owner would), and a mount that may still be served is never
    cleared behind its daemon. 0 when every one was unmounted, else 1."""
    if target is not None:
        found = [locate.find(target)]
    else:
        found = locate.mine()
        if not found:
            print("memfuse: no mounts are running")
            return 0
    signalled = []
    why: dict[Path, str | None] = {}  # mountpoint -> why its journal waited, if it did
    code = 0
    for mount in found:
        outcome = _stop(mount, target is not None, why)
        if outcome is None:
            signalled.append(mount)
        else:
            code = max(code, outcome)
    deadline = time.monotonic() + timeout
    for mount in signalled:
        code = max(code, _finish_umount(mount, deadline, timeout, why.get(mount.mountpoint)))
    return code


def _stop(mount: locate.Found, named: bool, why: dict[Path, str | None]) -> int | None:
    """Signal `mount`'s daemon (SIGTERM), noting in `why` its last report of why its journal
    waits. None: signalled, or its daemon is gone and its mount is to be cleared: wait for it;
    else the exit status for it (0: nothing to do, 1: refused or not found), already reported.
    `named`: the mount was asked for by name (not --all)."""
    mountpoint, record = mount.mountpoint, mount.record
    refusal = _refusal(mount)
    if refusal is not None:
        print(f"memfuse: {refusal}", file=sys.stderr)
        return 1
    if record is not None and record.alive():
        why[mountpoint] = _why_pending(mount)  # its last report, before it goes
        try:
            os.kill(record.pid, signal.SIGTERM)
        except PermissionError:
            uid = procs.uid_of(record.pid)
            owner = "another user" if uid is None else mounttable.user_name(uid)
            print(f"memfuse: {mountpoint} is served by pid {record.pid}, which belongs to "
                  f"{owner}" + (f" (uid {uid})" if uid is not None else "")
                  + f"; only {_who_can(owner, uid)} can unmount it", file=sys.stderr)
            return 1
        return None
    if mount.kernel is None:
        if named:
            print(f"memfuse: nothing is mounted at {mountpoint}", file=sys.stderr)
            return 1
        mount.pid_file.unlink(missing_ok=True)  # --all: a daemon that died, no mount left
        print(f"memfuse: {mountpoint}: its daemon (pid {record.pid}) is gone and nothing "
              f"is mounted; its pid file is removed")
        return 0
    if not mount.daemon_gone():
        print(f"memfuse: {_unrecorded(mount)}; left alone (memfuse umount clears only a "
              f"mount whose daemon is gone)", file=sys.stderr)
        return 1
    return None


def _refusal(mount: locate.Found) -> str | None:
    """Why `umount` leaves `mount` alone before looking at its daemon: not memfuse's, or
    another user's (we are not root); None when it may go on."""
    if mount.alien:
        return (f"{mount.mountpoint} is a {mount.kernel.fstype} mount, not a memfuse one; "
                f"left alone")
    if mount.private:
        return (f"{mount.mountpoint} is mounted by {mount.owner} (uid {mount.owner_uid}); only "
                f"{_who_can(mount.owner, mount.owner_uid)} can unmount it")
    return None


def _unrecorded(mount: locate.Found) -> str:
    """What is known of a mount whose daemon's record is missing or dead while the mount
    may still be served."""
    if answers(mount.mountpoint):
        return (f"{mount.mountpoint} is served by a live memfuse daemon that no pid file names "
                f"(none of a live daemon under this HOME, beside the mountpoint, or under the "
                f"HOME of a memfuse daemon running now)")
    return (f"{mount.mountpoint} is a memfuse mount of {mount.owner} whose daemon's record was "
            f"not found, so whether it is still served cannot be told")


def _who_can(owner: str, uid: int | None) -> str:
    """`ada (or root)`: who may stop a daemon `owner` runs."""
    return "root" if uid == 0 else f"{owner} (or root)"


def _finish_umount(mount: locate.Found, deadline: float, timeout: float,
                   why: str | None = None) -> int:
    """Wait (until `deadline`, time.monotonic()) for a daemon told to stop, then clear what it
    left and report (why: the reason its journal waited, from its last report); 1 when it did
    not finish in time."""
    record, mountpoint = mount.record, mount.mountpoint
    # until its pid is gone: a daemon that exits reads as no daemon (an empty command line)
    # before it is a zombie, and is a zombie until its parent reaps it
    while (record is not None and (record.alive() or procs.exiting(record.pid)
                                   or procs.zombie(record.pid))
           and time.monotonic() < deadline):
        time.sleep(0.05)
    if record is not None and record.alive():
        print(f"memfuse: daemon {record.pid} did not finish within {timeout:g} s "
              f"(log: {record.log_file})", file=sys.stderr)
        return 1
    clear_dead_mount(mountpoint)  # the daemon died without unmounting: clear the stale mount
    if mount.pid_file is not None:
        mount.pid_file.unlink(missing_ok=True)
    print(f"memfuse: unmounted {mountpoint}"
          + (f" (mounted by {mount.owner})" if mount.foreign else ""))
    pending = Journal(Path(record.journal_file)).pending() if record and record.journal_file else []
    if pending:
        print(f"memfuse: {len(pending)} change(s) the server did not take yet are kept in "
              f"{record.journal_file}; they are sent at the next mount, once the server takes "
              f"them" + (f" ({why})" if why else ""))
    return 0


def _why_pending(mount: locate.Found) -> str | None:
    """Why the daemon's journal waits, from its last status report (the server away, a
    refused key, a stuck change, a deleted agent, the last replay's outcome), or None."""
    if mount.pid_file is None:
        return None
    try:
        report = Status.load(mount.pid_file.parent / "memfuse.status.json")
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if report is None or not report.journal_pending:
        return None
    if report.agent_gone_since is not None:
        return "the agent is gone from the server"
    if not report.reachable:
        return "the server cannot be reached"
    return report.journal_stuck or (f"last attempt: {report.last_replay}"
                                    if report.last_replay else None)


def list_mounts() -> int:
    """`memfuse list`: one line per mount (many.render_list); always 0."""
    rows = many.mount_rows()
    print(many.render_list(rows) if rows else "memfuse: no mounts are running")
    return 0


def status(target: str | None) -> int:
    """Print the status of the mount `target` names (an agent id, or a mountpoint path whoever
    mounted it: locate.find), or of every mount with a pid file here. 0 when every one was
    reported; 1 when nothing is mounted, its daemon is gone, or its status cannot be read here
    (another user's mount: its owner is named)."""
    found = [locate.find(target)] if target is not None else locate.mine()
    if not found:
        print("memfuse: no mounts are running")
        return 0
    code = 0
    for mount in found:
        mountpoint, record = mount.mountpoint, mount.record
        if mount.alien:
            print(f"memfuse: {mountpoint} is a {mount.kernel.fstype} mount, not a memfuse one")
            code = 1
        elif mount.private:
            print(f"memfuse: {mountpoint} is a memfuse mount of {mount.owner} (uid "
                  f"{mount.owner_uid}); its daemon's records are {mount.owner}'s and private, "
                  f"so its status cannot be read here (run memfuse status as {mount.owner})")
            code = 1
        elif record is None or not record.alive():
            if mount.kernel is None:
                print(f"memfuse: nothing is mounted at {mountpoint}")
            elif mount.daemon_gone():
                print(f"memfuse: nothing is mounted at {mountpoint} (the daemon is gone; clear "
                      f"it with memfuse umount)")
            else:
                print(f"memfuse: {_unrecorded(mount)}")
            code = 1
        else:
            report = Status.of(mount.status_file, record.pid)
            print(report.render() if report else f"agent {record.agent_id} at {mountpoint} "
                  f"(pid {record.pid}): starting, no status yet")
            if mount.foreign:
                print(f"  mounted by     {mount.owner} (uid {mount.owner_uid})")
    return code


CMDLINE_SECRET = ("memfuse: warning: the URL given with --git-remote holds a password or "
                  "token, visible to other users in ps (with --foreground, for the whole "
                  "mount) and kept in your shell's history; set MEMFUSE_GIT_REMOTE or use a "
                  "git credential helper instead")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `memfuse` console script; returns the exit status (2: bad usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, RemoteError) as exc:
        print(f"memfuse: {exc}", file=sys.stderr)
        return 2


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors argparse cannot see (exit 2 through parser.error)."""
    if args.command == "umount" and args.all == (args.target is not None):
        parser.error("umount: give an AGENT_ID, a MOUNTPOINT or --all")
    if args.command == "mount":
        _check_selection(parser, args, "mount")
        if args.all and (args.mountpoint or args.history_dir or args.foreground):
            parser.error("mount --all: each agent is mounted at its default mountpoint with "
                         "its default history, in the background")
    if args.command == "service" and args.serve:
        if args.all or args.agent_id is not None or args.tag:
            parser.error("service install --serve: one unit serves every agent; give no "
                         "AGENT_ID, --all or --tag")
    elif args.command == "service":
        _check_selection(parser, args, "service install")
        if args.insecure or args.listen != gitserve.DEFAULT_LISTEN:
            parser.error("service install: --listen and --insecure go with --serve")


def _mount(args: argparse.Namespace) -> int:
    """`memfuse mount AGENT_ID|--all`. Raises ConfigError or RemoteError (a git remote that
    cannot be pushed to is refused before anything is mounted)."""
    git_remote = _git_remote(args)
    if args.all:
        return _mount_all(args, git_remote)
    config = _config(args, args.agent_id, args.mountpoint, git_remote)
    if args.foreground:
        return _mount_foreground(config, args.ready_fd)
    return _mount_background(args, config)


def _git_remote(args: argparse.Namespace) -> str | None:
    """The git remote URL (--git-remote, else $MEMFUSE_GIT_REMOTE), checked; warns when a
    password sits on the command line. Raises ConfigError or RemoteError."""
    git_remote = args.git_remote or os.environ.get(GIT_REMOTE_ENV) or None
    # kept in memory only: no child (git credential fill, its helpers) inherits it; each
    # daemon gets its own in its environment (_launch). /proc/PID/environ still shows the
    # environment this process started with: readable by its owner only, as for
    # LETTA_API_KEY.
    os.environ.pop(GIT_REMOTE_ENV, None)
    if git_remote:
        if args.all and AGENT_PLACEHOLDER not in git_remote:
            raise ConfigError(f"mount --all --git-remote: each agent's history needs a "
                              f"repository of its own; put {AGENT_PLACEHOLDER} in the URL "
                              f"where the agent id goes")
        remote = GitRemote(git_remote.replace(AGENT_PLACEHOLDER, "agent-id"))
        if args.git_remote and remote.secret_in_url:
            print(CMDLINE_SECRET, file=sys.stderr)
    return git_remote


def _service_install(args: argparse.Namespace) -> int:
    """`memfuse service install AGENT_ID|--all`: write the unit, then enable the instances
    with systemctl when a user systemd answers, else print the commands (service.py);
    `--serve`: the same for the unit of `memfuse serve`. Raises ConfigError (--listen)."""
    if args.serve:
        return _service_install_serve(args)
    if args.all:
        try:
            agents, where = _selected_agents(args)
        except ServerCallError as exc:
            print(f"memfuse: could not list the agents: {exc.failure}", file=sys.stderr)
            return 1
        if not agents:
            print(f"memfuse: no agents {where}; the unit is installed, no instance enabled")
        agent_ids = [agent.id for agent in agents]
    else:
        agent_ids = [check_agent_id(args.agent_id)]
    try:
        unit = service.install_unit()
    except OSError as exc:
        print(f"memfuse: could not write the unit to {service.unit_dir()}: {exc}",
              file=sys.stderr)
        return 1
    print(f"memfuse: wrote {unit}")
    mounted = frozenset(a for a in agent_ids if many.live_mount(a) is not None)
    lines, code = service.enable(agent_ids, now=not args.no_enable and service.user_systemd(),
                                 mounted=mounted)
    _print_lines(lines)
    return code


def _print_lines(lines: list[str]) -> None:
    """service.py's lines for a person: commands as they are, the rest after `memfuse: `."""
    for line in lines:
        print(line if line.startswith(("  ", "systemctl")) else f"memfuse: {line}")


def _service_install_serve(args: argparse.Namespace) -> int:
    """`memfuse service install --serve [--listen HOST:PORT] [--insecure]`."""
    _listen_address(args.listen, args.insecure)
    try:
        unit = service.install_unit(name=service.SERVE_UNIT, text=service.render_serve_unit(
            args.listen, args.insecure))
    except OSError as exc:
        print(f"memfuse: could not write the unit to {service.unit_dir()}: {exc}",
              file=sys.stderr)
        return 1
    print(f"memfuse: wrote {unit}")
    lines, code = service.enable_serve(now=not args.no_enable and service.user_systemd())
    _print_lines(lines)
    return code


def _listen_address(listen: str, insecure: bool) -> tuple[str, int]:
    """`--listen`'s (host, port). Raises ConfigError: not HOST:PORT, or beyond loopback
    without `insecure`."""
    host, port = gitserve.parse_listen(listen)
    if not gitserve.loopback(host) and not insecure:
        raise ConfigError(f"--listen {listen}: git sends the API key as a Basic password, "
                          f"in clear text beyond loopback and memfuse serves no TLS; put a TLS "
                          f"proxy in front and pass --insecure to listen there anyway")
    return host, port


def _serve(args: argparse.Namespace) -> int:
    """`memfuse serve`: git's smart HTTP for the agents of the server, in the foreground until
    SIGINT or SIGTERM (gitserve.py). One line on stdout with the URL once it listens; a status
    record for `memfuse status` while it runs. Raises ConfigError (a bad --listen, a
    non-loopback one without --insecure)."""
    host, port = _listen_address(args.listen, args.insecure)
    _setup_logging(args.debug)
    base_url = args.base_url or os.environ.get("LETTA_BASE_URL") or DEFAULT_BASE_URL
    app = gitserve.GitEndpoint(base_url)
    try:
        server = gitserve.Server(app, host, port)
    except OSError as exc:
        print(f"memfuse: cannot listen on {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    status = gitserve.ServeStatus(gitserve.record_file(server.host, server.port),
                                  gitserve.RunningServe(server.url, os.getpid(), base_url,
                                                        time.time()))
    app.on_answer = status.answered
    signal.signal(signal.SIGTERM, _interrupted)
    print(f"memfuse: serving {server.url}/v1/git/<agent-id>/state.git for the agents of "
          f"{base_url} (Ctrl-C to stop)", flush=True)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        status.remove()
    print("memfuse: serve stopped", file=sys.stderr)
    return 0


def _interrupted(signum: int, _frame) -> None:
    """SIGTERM: stop `memfuse serve` as Ctrl-C does (waitress returns from its loop)."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _status(args: argparse.Namespace) -> int:
    """`memfuse status [TARGET]`: the mounts (`status`), then, without a target, every
    running `memfuse serve`."""
    code = status(args.target)
    if args.target is None:
        for _path, record in gitserve.serve_records():
            print(record.render())
    return code


def _git_memory(args: argparse.Namespace) -> int:
    """`memfuse git-memory enable|disable AGENT_ID` (gitmemory.py). Refused (exit 1) while
    memfuse mounts the agent here: its labels would move under the mount. Holds the agent's
    history lock meanwhile, so no mount of its default history starts during it."""
    agent_id, command = check_agent_id(args.agent_id), args.git_memory_command
    base_url = args.base_url or os.environ.get("LETTA_BASE_URL") or DEFAULT_BASE_URL
    if many.live_mount(agent_id) is not None:
        print(f"memfuse: git-memory {command}: agent {agent_id} is mounted by memfuse, and "
              f"its labels would move under the mount; unmount it first (memfuse umount "
              f"{agent_id}), then mount it again afterwards", file=sys.stderr)
        return 1
    try:
        record = gitmemory.Record.load(agent_id)
    except ValueError as exc:
        print(f"memfuse: git-memory {command}: {exc}", file=sys.stderr)
        return 1
    if record is not None and record.base_url.rstrip("/") != base_url.rstrip("/"):
        print(f"memfuse: git-memory {command}: {gitmemory.record_file(agent_id)} records an "
              f"enable on {record.base_url}, not {base_url}; give --base-url "
              f"{record.base_url}", file=sys.stderr)
        return 1
    lock = WriterLock(Config.build(agent_id).writer_lock_file)
    if not lock.acquire(5.0):
        print(f"memfuse: git-memory {command}: the history of agent {agent_id} is being "
              f"written by another memfuse process (a mount starting?); try again",
              file=sys.stderr)
        return 1
    try:
        trio.run(partial(_git_memory_run, args, agent_id, base_url, record))
    except ServerCallError as exc:
        print(f"memfuse: git-memory {command}: {exc.failure} (run it again: it is "
              f"idempotent)", file=sys.stderr)
        return 1
    finally:
        lock.release()
    return 0


async def _git_memory_run(args: argparse.Namespace, agent_id: str, base_url: str,
                          record: gitmemory.Record | None) -> None:
    def say(line: str) -> None:
        print(f"memfuse: {line}", flush=True)

    async with make_client(base_url, os.environ.get("LETTA_API_KEY") or None) as client:
        remote = Remote(client, agent_id)
        if args.git_memory_command == "enable":
            await gitmemory.enable(remote, base_url, say, frozenset(args.include_shared),
                                   args.dry_run)
        else:
            await gitmemory.disable(remote, record, say)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "mount": _mount,
    "umount": lambda args: umount(None if args.all else args.target, args.timeout),
    "status": _status,
    "serve": _serve,
    "list": lambda args: list_mounts(),
    "service": _service_install,
    "git-memory": _git_memory,
}


if __name__ == "__main__":
    sys.exit(main())
