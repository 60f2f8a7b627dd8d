"""Real git servers on loopback for the git remote tests: `git daemon --enable=receive-pack`,
smart HTTP (`git http-backend` behind a small CGI server with HTTP basic auth), and a listener
that accepts connections and never answers (a remote that hangs)."""
from __future__ import annotations

import base64
import os
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(*args: str, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run git; its stdout, stripped. Raises AssertionError (with git's stderr) on failure."""
    result = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


def init_bare(path: Path) -> Path:
    git("init", "--quiet", "--bare", "--initial-branch=main", str(path))
    return path


def head_of(git_dir: Path) -> str | None:
    """The commit of refs/heads/main in the repository at `git_dir`, or None."""
    result = subprocess.run(["git", "--git-dir", str(git_dir), "rev-parse", "--verify", "-q",
                             "refs/heads/main"], capture_output=True, text=True, timeout=60)
    return result.stdout.strip() or None


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports the process `pid` itself listens on (its sockets' inodes, found in
    /proc/net/tcp and tcp6 in the LISTEN state): not whoever else answers on a port."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


class GitDaemon:
    """`git daemon` serving every repository under `root` at git://127.0.0.1:PORT/, with
    pushes enabled; `stop` and `start` again on the same port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, name: str) -> str:
        return f"git://127.0.0.1:{self.port}/{name}"

    def start(self, attempts: int = 40, pause: float = 0.25) -> None:
        """Serve on `self.port` (the same one at every start: the URLs given out name it),
        returning once this git daemon listens there. The port may be held for a while
        (free_port's race: another process took it; or what still holds it after a stop): a
        git daemon that cannot bind exits, and another is started, up to `attempts` times
        `pause` s apart; then AssertionError with git daemon's last words."""
        said = ""
        for _ in range(attempts):
            proc = subprocess.Popen(  # git-daemon itself: `git daemon` would be its parent
                [str(Path(git("--exec-path")) / "git-daemon"), "--enable=receive-pack", "--export-all", "--reuseaddr",
                 f"--base-path={self.root}", "--listen=127.0.0.1", f"--port={self.port}",
                 "--informative-errors", str(self.root)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if _until_listening(proc, self.port):
                self.proc = proc
                return
            said = proc.stderr.read()
            proc.stderr.close()
            if "Address already in use" not in said:
                raise AssertionError(f"git daemon exited: {said}")
            time.sleep(pause)
        raise AssertionError(f"git daemon could not listen on port {self.port} in {attempts} "
                             f"attempts {pause:g} s apart: {said}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
            self.proc.stderr.close()
            self.proc = None


def _until_listening(proc: subprocess.Popen, port: int) -> bool:
    """Wait until `proc` listens on `port` (True) or exits (False); a process doing neither
    for 30 s is killed (AssertionError)."""
    deadline = time.monotonic() + 30
    while proc.poll() is None:
        if port in _listening_ports(proc.pid):
            return True
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError(f"git daemon did not listen on port {port} within 30 s")
        time.sleep(0.05)
    return False


class _CgiHandler(BaseHTTPRequestHandler):
    """Runs `git http-backend` for each request, with basic auth required."""

    server: "GitHttp"

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def log_message(self, *_args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _serve(self) -> None:
        body = self._body() if self.command == "POST" else b""
        expected = "Basic " + base64.b64encode(
            f"{self.server.user}:{self.server.password}".encode()).decode()
        if self.headers.get("Authorization") != expected:
            self.server.refused += 1
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="memfuse-test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        path, _, query = self.path.partition("?")
        env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(self.server.root),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "REQUEST_METHOD": self.command,
               "QUERY_STRING": query, "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_USER": self.server.user,
               "REMOTE_ADDR": "127.0.0.1", "GATEWAY_INTERFACE": "CGI/1.1",
               "SERVER_PROTOCOL": "HTTP/1.1"}
        if self.headers.get("Content-Encoding"):
            env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                             timeout=60).stdout
        head, _, payload = out.partition(b"\r\n\r\n")
        if not _:
            head, _, payload = out.partition(b"\n\n")
        status, headers = 200, []
        for line in head.decode().splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name, value.strip()))
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


class GitHttp(ThreadingHTTPServer):
    """Smart HTTP for every repository under `root` at http://127.0.0.1:PORT/, every request
    requiring basic auth as `user`:`password`; `refused` counts the 401s sent."""

    daemon_threads = True

    def __init__(self, root: Path, user: str, password: str):
        super().__init__(("127.0.0.1", 0), _CgiHandler)
        self.root, self.user, self.password, self.refused = root, user, password, 0
        self.port = self.server_address[1]
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def url(self, name: str, credentials: bool = False) -> str:
        auth = f"{self.user}:{self.password}@" if credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class Silent:
    """A TCP listener on loopback that accepts connections and never answers (a hung remote)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        """Stop listening and drop the connections. A close alone would not do: the thread
        blocked in accept() keeps the socket open and listening; a shutdown wakes it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=10)
        for conn in self.accepted:
            conn.close()
