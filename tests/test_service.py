"""`memfuse service install` without a user systemd: the unit's content, checked by
`systemd-analyze verify`, where it is written, and what is run or printed to enable it."""
import os
import subprocess
import tomllib
from pathlib import Path

import pytest

from memfuse import cli, service
from memfuse.config import RunningMount

from .test_cli import live_pid  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("LETTA_API_KEY", "sk-secret-key")
    (tmp_path / "home").mkdir()
    return tmp_path


def fake_systemctl(tmp_path, monkeypatch, *, answers: bool) -> Path:
    """A `systemctl` first on PATH that logs its arguments; `--user show-environment` (is a
    user systemd there?) succeeds only when `answers`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    script = bin_dir / "systemctl"
    script.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n"
                      f"[ \"$2\" = show-environment ] && exit {0 if answers else 1}\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return calls


def verify(unit: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """`systemd-analyze verify --user` as a user manager would load `unit`; it needs a runtime
    directory (none exists without a session), nothing else."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run([SYSTEMD_ANALYZE, "verify", "--user", str(unit)], capture_output=True,
                          text=True, env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))


def test_the_installed_unit_passes_systemd_analyze_verify(home, monkeypatch, capsys):
    fake_systemctl(home, monkeypatch, answers=False)
    assert cli.main(["service", "install", "agent-x"]) == 0
    unit = home / "config/systemd/user/memfuse@.service"
    instance = home / "memfuse@agent-x.service"  # a template is verified as an instance
    instance.write_text(unit.read_text())
    for path in (unit, instance):
        result = verify(path, home)
        # a wrong key or value is only a warning to systemd: any output fails the test too
        assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
            f"{path.name}: {result.stdout}{result.stderr}")


def test_a_broken_unit_fails_verify(home):
    """The check above can fail: a unit with a bad value or a missing program does."""
    good = service.render_unit()
    for broken in (good.replace("Restart=on-failure", "Restart=sometimes"),
                   good.replace(service.memfuse_command()[0], "/nowhere/memfuse")):
        path = home / "memfuse@agent-x.service"
        path.write_text(broken)
        result = verify(path, home)
        assert result.returncode != 0 or (result.stdout + result.stderr).strip()


def test_the_unit_runs_this_memfuse_in_the_foreground_and_never_holds_the_key(home, monkeypatch):
    fake_systemctl(home, monkeypatch, answers=False)
    assert cli.main(["service", "install", "agent-x"]) == 0
    text = (home / "config/systemd/user/memfuse@.service").read_text()
    lines = text.splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(program).is_absolute() and os.access(program, os.X_OK)
    assert exec_start.endswith(" mount %i --foreground")  # %i: the agent id, unescaped
    assert "Restart=on-failure" in lines
    assert "EnvironmentFile=-%E/memfuse/env" in lines  # optional ("-"), the user's own file
    assert "WantedBy=default.target" in lines
    assert "sk-secret-key" not in text and "LETTA_API_KEY=" not in text
    assert not (home / "config/memfuse/env").exists()  # memfuse never writes it


def test_an_unusual_install_path_is_quoted_for_systemd(home):
    text = service.render_unit(["/opt/my tools/50%/memfuse"])
    assert 'ExecStart="/opt/my tools/50%%/memfuse" mount %i --foreground' in text


def test_without_a_user_systemd_the_commands_are_printed(home, monkeypatch, capsys):
    calls = fake_systemctl(home, monkeypatch, answers=False)
    assert cli.main(["service", "install", "agent-x"]) == 0
    out = capsys.readouterr().out
    assert f"memfuse: wrote {home}/config/systemd/user/memfuse@.service" in out
    assert "\n  systemctl --user daemon-reload\n" in out
    assert "\n  systemctl --user enable --now memfuse@agent-x.service\n" in out
    assert f"{home}/config/memfuse/env" in out  # where the key goes, written by the user
    assert calls.read_text().splitlines() == ["--user show-environment"]  # nothing enabled


def test_with_a_user_systemd_the_instances_are_enabled_and_started(home, monkeypatch, capsys,
                                                                   live_pid):
    calls = fake_systemctl(home, monkeypatch, answers=True)
    state = home / "home/.letta/agents/agent-b"
    state.mkdir(parents=True)
    RunningMount("agent-b", str(state / "memory"), live_pid, "http://x",
                 str(state / "memfuse.log")).save(state / "memfuse.pid")
    for agent in ("agent-a", "agent-b"):
        assert cli.main(["service", "install", agent]) == 0
    assert calls.read_text().splitlines() == [
        "--user show-environment", "--user daemon-reload",
        "--user enable --now memfuse@agent-a.service",
        "--user show-environment", "--user daemon-reload",
        "--user enable memfuse@agent-b.service"]  # mounted by hand now: not started
    out = capsys.readouterr().out
    assert "enabled memfuse@agent-a.service and started it" in out
    assert "memfuse umount agent-b && systemctl --user start memfuse@agent-b.service" in out


def test_install_all_enables_an_instance_per_agent(home, monkeypatch, capsys):
    from memfuse import many
    calls = fake_systemctl(home, monkeypatch, answers=True)

    async def server_agents(base_url, api_key, tags):
        assert tags == ["team"]
        return [many.Agent("agent-a", "A"), many.Agent("agent-b", "B")]

    monkeypatch.setattr(many, "server_agents", server_agents)
    assert cli.main(["service", "install", "--all", "--tag", "team"]) == 0
    assert calls.read_text().splitlines()[-2:] == [
        "--user enable --now memfuse@agent-a.service",
        "--user enable --now memfuse@agent-b.service"]


def test_the_unit_dir_is_under_xdg_config_home_else_dot_config(home, monkeypatch):
    assert service.unit_dir() == home / "config/systemd/user"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert service.unit_dir() == home / "home/.config/systemd/user"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/dir")  # the XDG spec: ignored
    assert service.unit_dir() == home / "home/.config/systemd/user"


def test_the_unit_template_is_package_data():
    """`pip install` / `uv tool install` carry the template only if setuptools is told to."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for unit in (service.TEMPLATE, service.SERVE_UNIT):
        assert unit in config["tool"]["setuptools"]["package-data"]["memfuse"]
        assert (ROOT / "memfuse" / unit).is_file()


def test_memfuse_installs_on_any_python_from_3_11():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["project"]["requires-python"] == ">=3.11"


# --- the unit of `memfuse serve` (issue 20 point 1) ---------------------------------------------

def test_install_serve_writes_a_unit_that_verifies_and_runs_serve_with_its_listen(
        home, monkeypatch, capsys):
    calls = fake_systemctl(home, monkeypatch, answers=False)
    assert cli.main(["service", "install", "--serve", "--listen", "127.0.0.1:9285"]) == 0
    unit = home / "config/systemd/user/memfuse-serve.service"
    text = unit.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    program = exec_start.removeprefix("ExecStart=").split()[0]
    assert Path(program).is_absolute() and os.access(program, os.X_OK)
    assert exec_start.endswith(" serve --listen 127.0.0.1:9285")
    assert "EnvironmentFile=-%E/memfuse/env" in text and "sk-secret-key" not in text
    result = verify(unit, home)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr)
    out = capsys.readouterr().out
    assert "\n  systemctl --user enable memfuse-serve.service\n" in out
    assert "\n  systemctl --user restart memfuse-serve.service\n" in out
    assert calls.read_text().splitlines() == ["--user show-environment"]


def test_install_serve_enables_and_restarts_it_with_a_user_systemd(home, monkeypatch, capsys):
    calls = fake_systemctl(home, monkeypatch, answers=True)
    assert cli.main(["service", "install", "--serve"]) == 0
    assert calls.read_text().splitlines() == [
        "--user show-environment", "--user daemon-reload",
        "--user enable memfuse-serve.service", "--user restart memfuse-serve.service"]
    assert "enabled memfuse-serve.service and started it" in capsys.readouterr().out
    text = (home / "config/systemd/user/memfuse-serve.service").read_text()
    assert " serve --listen 127.0.0.1:8285\n" in text  # serve's default


def test_install_serve_refuses_an_address_beyond_loopback_without_insecure(home, monkeypatch,
                                                                           capsys):
    fake_systemctl(home, monkeypatch, answers=False)
    assert cli.main(["service", "install", "--serve", "--listen", "0.0.0.0:8285"]) == 2
    assert "put a TLS proxy in front and pass --insecure" in capsys.readouterr().err
    assert not (home / "config/systemd/user/memfuse-serve.service").exists()
    assert cli.main(["service", "install", "--serve", "--listen", "0.0.0.0:8285",
                     "--insecure"]) == 0
    text = (home / "config/systemd/user/memfuse-serve.service").read_text()
    assert " serve --listen 0.0.0.0:8285 --insecure\n" in text
    with pytest.raises(SystemExit):  # one unit serves every agent
        cli.main(["service", "install", "--serve", "agent-x"])
    with pytest.raises(SystemExit):  # --listen belongs to --serve
        cli.main(["service", "install", "agent-x", "--listen", "127.0.0.1:1"])
