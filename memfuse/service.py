"""`memfuse service install`: the systemd user units that mount an agent at login, and that
run `memfuse serve` (`--serve`: SERVE_UNIT, one per user, its ExecStart carrying --listen).

The unit is a template, `memfuse@.service`, shipped in the package (package data); its instance
is the agent id, and it runs `memfuse mount <agent-id> --foreground` (SIGTERM unmounts cleanly).
Installing writes it to the user unit directory with the absolute path of this memfuse in
`ExecStart`, then enables the instances with `systemctl --user enable --now` when a user
systemd answers, or says which commands to run when none does (a container, an ssh session
without lingering). The API key is never written: the unit reads LETTA_BASE_URL and
LETTA_API_KEY from an optional EnvironmentFile the user owns (ENV_FILE).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

from .config import check_agent_id

TEMPLATE = "memfuse@.service"
SERVE_UNIT = "memfuse-serve.service"
PLACEHOLDER = "@MEMFUSE@"  # where the template's ExecStart names the memfuse to run
SYSTEMCTL_TIMEOUT = 30.0  # seconds for one systemctl call (enable --now waits for the start)


def config_home() -> Path:
    """$XDG_CONFIG_HOME when set to an absolute path (the XDG spec ignores a relative one),
    else ~/.config."""
    value = os.environ.get("XDG_CONFIG_HOME", "")
    return Path(value) if os.path.isabs(value) else Path(os.path.expanduser("~")) / ".config"


def unit_dir() -> Path:
    """Where systemd looks for the user's own units: `<config_home>/systemd/user`."""
    return config_home() / "systemd" / "user"


def env_file() -> Path:
    """The unit's EnvironmentFile (`%E/memfuse/env`: %E is the config home in a user unit)."""
    return config_home() / "memfuse" / "env"


def template(name: str = TEMPLATE) -> str:
    """The unit `name` as shipped in the package (with PLACEHOLDER for the command)."""
    return resources.files("memfuse").joinpath(name).read_text()


def memfuse_command() -> list[str]:
    """The absolute command that runs this memfuse: the `memfuse` script installed beside the
    running interpreter (a venv's bin/, a `uv tool` or pipx environment), else that
    interpreter with `-m memfuse.cli`. sys.executable is not resolved: a venv's python is a
    symlink whose target has no memfuse."""
    script = Path(sys.executable).parent / "memfuse"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script.absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "memfuse.cli"]


def _exec_word(word: str) -> str:
    # systemd expands % specifiers and splits on spaces in ExecStart: escape and quote
    word = word.replace("%", "%%")
    if any(c.isspace() or c in "\"\\'" for c in word):
        return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return word


def _render(name: str, words: list[str]) -> str:
    """The unit `name` with the command line `words` in ExecStart (escaped for systemd)."""
    return template(name).replace(PLACEHOLDER, " ".join(_exec_word(w) for w in words))


def render_unit(command: list[str] | None = None) -> str:
    """The template with `command` (default memfuse_command()) in ExecStart."""
    return _render(TEMPLATE, memfuse_command() if command is None else command)


def render_serve_unit(listen: str, insecure: bool = False,
                      command: list[str] | None = None) -> str:
    """SERVE_UNIT with `command` (default memfuse_command()) `serve --listen <listen>` (and
    `--insecure`) in ExecStart. `listen` is checked by the caller (cli)."""
    command = memfuse_command() if command is None else command
    return _render(SERVE_UNIT, [*command, "serve", "--listen", listen,
                                *(["--insecure"] if insecure else [])])


def install_unit(command: list[str] | None = None, *, name: str = TEMPLATE,
                 text: str | None = None) -> Path:
    """Write the unit `name` (`text`, default the rendered template) to `unit_dir()` (created
    if missing; replaced atomically, so a memfuse moved or upgraded is picked up by installing
    again). Returns the path. Raises OSError."""
    directory = unit_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_name(f".{name}.tmp")
    tmp.write_text(render_unit(command) if text is None else text)
    os.replace(tmp, path)
    return path


def instance(agent_id: str) -> str:
    """`memfuse@<agent_id>.service` (agent ids are letters, digits, `-`, `_`, `.`: valid in a
    unit name as they are; `%i` gives them back unescaped). Raises ConfigError."""
    return f"memfuse@{check_agent_id(agent_id)}.service"


def user_systemd() -> bool:
    """Whether a user systemd answers (`systemctl --user show-environment` succeeds)."""
    if shutil.which("systemctl") is None:
        return False
    try:
        return subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                              timeout=SYSTEMCTL_TIMEOUT).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _env_file_line() -> list[str]:
    if env_file().exists():
        return []
    return [f"the units read LETTA_BASE_URL and LETTA_API_KEY from {env_file()} (KEY=value "
            f"lines; create it yourself, chmod 600): without it they use "
            f"http://localhost:8283 with no key"]


def enable_serve(*, now: bool) -> tuple[list[str], int]:
    """Enable and start SERVE_UNIT with systemctl when `now` (restarted when it runs, so a
    new --listen takes), else say which commands would. Returns (lines for a person, exit
    status: 1 when a systemctl call failed)."""
    lines = _env_file_line()
    commands = [["systemctl", "--user", "daemon-reload"],
                ["systemctl", "--user", "enable", SERVE_UNIT],
                ["systemctl", "--user", "restart", SERVE_UNIT]]
    if not now:
        lines.append("no user systemd answers here (or --no-enable); to run it at login, run:")
        lines += ["  " + " ".join(command) for command in commands]
        return lines, 0
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=SYSTEMCTL_TIMEOUT)
        if result.returncode != 0:
            return lines + [f"FAILED: {' '.join(command)}: {result.stderr.strip()}"], 1
    return lines + [f"enabled {SERVE_UNIT} and started it"], 0


def enable(agent_ids: list[str], *, now: bool, mounted: frozenset[str] = frozenset()
           ) -> tuple[list[str], int]:
    """Enable (and start) `memfuse@<id>.service` for each id with systemctl when `now`, else
    say which commands would. An agent in `mounted` (served by a daemon started by hand) is
    enabled but not started: its service would fail as "already mounted" and retry.
    Returns (lines for a person, exit status: 1 when a systemctl call failed)."""
    lines = _env_file_line()
    if not agent_ids:
        return lines, 0
    commands = [["systemctl", "--user", "daemon-reload"]] + [
        ["systemctl", "--user", "enable", *([] if agent_id in mounted else ["--now"]),
         instance(agent_id)] for agent_id in agent_ids]
    if not now:
        lines.append("no user systemd answers here (or --no-enable); to mount at login, run:")
        lines += ["  " + " ".join(command) for command in commands]
        return lines, 0
    code = 0
    for agent_id, command in zip([None, *agent_ids], commands):
        result = subprocess.run(command, capture_output=True, text=True,
                                timeout=SYSTEMCTL_TIMEOUT)
        if result.returncode != 0:
            code = 1
            lines.append(f"FAILED: {' '.join(command)}: {result.stderr.strip()}")
        elif agent_id is not None:
            lines.append(f"enabled {instance(agent_id)}" + (
                " and started it" if agent_id not in mounted else
                f" (not started: it is mounted already; it starts at the next login, or now "
                f"with: memfuse umount {agent_id} && systemctl --user start "
                f"{instance(agent_id)})"))
    return lines, code
