"""The service checks of ``setup --services`` and ``doctor`` without the services: parsers and messages."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from aiida_emlip.cli.doctor import Report, check_consumer_timeout
from aiida_emlip.profile import daemon_problem
from aiida_emlip.services import consumer_timeout as ct
from aiida_emlip.services.postgres import DatabaseSetupError, create_database, database_name
from aiida_emlip.services.reachability import install_commands, postgres, rabbitmq, unreachable_message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("listeners.tcp.local = 127.0.0.1:5672\n", ct.NOT_SET),
        ("consumer_timeout = 3600000\n", 3_600_000),
        ("# consumer_timeout = 5\nconsumer_timeout=7200000  # two hours\n", 7_200_000),
        ("consumer_timeout = 1000\nconsumer_timeout = 2000\n", 2000),  # the last one wins
    ],
)
def test_rabbitmq_conf(text, expected):
    assert ct.parse_rabbitmq_conf(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[{rabbit, [{consumer_timeout, undefined}]}].", None),
        ("[\n {rabbit, [\n  {tcp_listeners, [5672]},\n  {consumer_timeout, 86400000}\n ]}\n].", 86_400_000),
        ("%% {consumer_timeout, 5}\n[{rabbit, [{heartbeat, 30}]}].", ct.NOT_SET),
    ],
)
def test_advanced_config(text, expected):
    assert ct.parse_advanced_config(text) == expected


def test_rabbitmqctl_answers():
    assert ct.parse_rabbitmqctl("{ok,1800000}\n") == 1_800_000
    assert ct.parse_rabbitmqctl("{ok,undefined}") is None
    assert ct.parse_rabbitmqctl("undefined\n") is None
    assert ct.parse_rabbitmqctl("Error: unable to perform an operation on node") is ct.NOT_SET


def _no_rabbitmqctl(*args, **kwargs):
    raise OSError("rabbitmqctl not available here")


def test_reading_order_and_unknown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """rabbitmqctl first, then advanced.config over rabbitmq.conf, the default if unset; else unknown."""
    conf, advanced = tmp_path / "rabbitmq.conf", tmp_path / "advanced.config"
    asked = subprocess.CompletedProcess([], 0, stdout="{ok,7200000}\n", stderr="")
    monkeypatch.setattr(ct.shutil, "which", lambda name: "/usr/sbin/rabbitmqctl")
    running = ct.read_consumer_timeout("127.0.0.1", run=lambda *a, **k: asked, files=(conf, advanced))
    assert (running.value_ms, running.known) == (7_200_000, True) and "rabbitmqctl" in running.source
    assert not running.sufficient and "2 h" in running.describe()

    monkeypatch.setattr(ct.shutil, "which", lambda name: None)
    unknown = ct.read_consumer_timeout("127.0.0.1", files=(conf, advanced))
    assert not unknown.known and "rabbitmqctl not found" in unknown.source and "unknown" in unknown.describe()

    conf.write_text("listeners.tcp.local = 127.0.0.1:5672\n")
    default = ct.read_consumer_timeout("127.0.0.1", files=(conf, advanced))
    assert default.value_ms == ct.DEFAULT_MS and "not set in" in default.source
    assert default.describe().startswith("consumer_timeout 1800000 ms = 30 min")

    conf.write_text("consumer_timeout = 36000000\n")
    assert ct.read_consumer_timeout("127.0.0.1", files=(conf, advanced)).value_ms == 36_000_000
    advanced.write_text("[{rabbit, [{consumer_timeout, undefined}]}].\n")
    off = ct.read_consumer_timeout("127.0.0.1", files=(conf, advanced))
    assert off.value_ms is None and off.sufficient and off.source == str(advanced)

    remote = ct.read_consumer_timeout("broker.example.org", files=(conf, advanced))
    assert not remote.known and "broker.example.org" in remote.source


def test_config_files_follow_the_environment(tmp_path: Path):
    (tmp_path / "rabbitmq-env.conf").write_text("CONFIG_FILE=/srv/rmq/main\nNODENAME=rabbit@localhost\n")
    conf, advanced = ct.config_files(tmp_path, environ={})
    assert conf == Path("/srv/rmq/main.conf") and advanced == tmp_path / "advanced.config"
    conf, _ = ct.config_files(tmp_path, environ={"RABBITMQ_CONFIG_FILE": "/etc/other.conf"})
    assert conf == Path("/etc/other.conf")


def test_doctor_consumer_line():
    """A 30 min timeout is a note with the fix; no timeout is fine; an unknown one is a note, not an error."""
    report = Report()
    check_consumer_timeout(
        report, "127.0.0.1", read=lambda host: ct.ConsumerTimeout(1_800_000, True, "rabbitmqctl")
    )
    assert report.ok and report.lines[0].startswith("[ note  ] consumer")
    assert "30 min" in report.lines[0] and "consumer_timeout = 36000000" in report.lines[1]
    report = Report()
    check_consumer_timeout(
        report, "127.0.0.1", read=lambda host: ct.ConsumerTimeout(None, True, "advanced.config")
    )
    assert report.lines == [
        "[  ok   ] consumer   consumer_timeout off (from advanced.config): daemon processes may run any time"
    ]
    report = Report()
    check_consumer_timeout(report, "127.0.0.1", read=lambda host: ct.ConsumerTimeout(None, False, "no files"))
    assert report.ok and "unknown (no files)" in report.lines[0] and "fix:" in report.lines[1]


def test_unreachable_messages():
    installed = {"postgresql": True, "rabbitmq-server": False}
    text = unreachable_message(postgres(port=5999), debian=True, installed=installed.get)
    assert "not reachable at 127.0.0.1:5999" in text and "service postgresql start" in text
    text = unreachable_message(rabbitmq(), debian=True, installed=installed.get)
    assert (
        "not installed" in text
        and "apt-get install -y rabbitmq-server" in text
        and "--install-services" in text
    )
    text = unreachable_message(rabbitmq(), debian=False, installed=installed.get)
    assert "apt-get" not in text and "--broker-host/--broker-port" in text
    text = unreachable_message(postgres("db.example.org"), debian=True, installed=installed.get)
    assert "db.example.org:5432" in text and "apt-get" not in text


def test_install_commands_only_install_what_is_missing():
    services = [postgres(), rabbitmq()]
    commands = install_commands(services, installed={"postgresql": True, "rabbitmq-server": False}.get)
    installs = [c for c in commands if "apt-get install" in c]
    assert len(installs) == 1 and installs[0].endswith("apt-get install -y rabbitmq-server")
    assert commands[-2:] == [c for c in commands if "service" in c] and len(commands) == 4
    assert not any("apt-get" in c for c in install_commands(services, installed=lambda p: True))


class FakePostgres:
    """Executes CREATE DATABASE only for the locales it knows, like a server without en_US.UTF-8."""

    def __init__(self, locales: set[str]):
        self.locales, self.databases, self.statements = locales, set(), []

    def execute(self, sql: str) -> None:
        self.statements.append(sql)
        locale = sql.split("LC_COLLATE")[1].split()[0].strip("='")
        if locale not in self.locales:
            raise RuntimeError(f'invalid locale name: "{locale}"')
        self.databases.add(sql.split('"')[1])

    def create_default(self) -> None:
        self.execute(
            "CREATE DATABASE \"db\" OWNER \"db\" ENCODING 'UTF8' LC_COLLATE='en_US.UTF-8' TEMPLATE=template0"
        )


def test_database_locale_fallback():
    """aiida-core's en_US.UTF-8 first; without it C.UTF-8, then C; with none, what to do."""
    for locales, expected in (
        ({"en_US.UTF-8", "C.UTF-8"}, "en_US.UTF-8"),
        ({"C.UTF-8"}, "C.UTF-8"),
        ({"C"}, "C"),
    ):
        server = FakePostgres(locales)
        locale = create_database(
            server.execute, server.databases.__contains__, "db", "db", create_default=server.create_default
        )
        assert locale == expected and server.databases == {"db"}
        if expected == "C.UTF-8":
            assert "TEMPLATE template0" in server.statements[-1]
    server = FakePostgres(set())
    with pytest.raises(DatabaseSetupError, match="locale-gen") as info:
        create_database(
            server.execute, server.databases.__contains__, "db", "db", create_default=server.create_default
        )
    assert 'CREATE DATABASE "db" OWNER "db"' in str(info.value) and len(server.statements) == 3


def test_database_names_differ_per_configuration_folder(tmp_path: Path):
    one, two = (
        database_name("emlip-services", tmp_path / "a"),
        database_name("emlip-services", tmp_path / "b"),
    )
    assert one != two and one.startswith("emlip_emlip_services_") and len(one) <= 63


def test_daemon_problem():
    sqlite = daemon_problem("core.sqlite_dos", "core.rabbitmq", "presto")
    assert "SQLite" in sqlite and "database is locked" in sqlite and "aiida-emlip setup --services" in sqlite
    assert "no broker" in daemon_problem("core.psql_dos", None, "p")
    assert daemon_problem("core.psql_dos", "core.rabbitmq", "p") is None


def test_install_services_prints_then_runs(monkeypatch: pytest.MonkeyPatch, capsys):
    """--install-services: each command printed before it runs; a failing one stops with exit code 3."""
    from aiida_emlip.cli import setup_services
    from aiida_emlip.services import reachability

    monkeypatch.setattr(setup_services, "is_debian", lambda: True)
    monkeypatch.setattr(reachability, "package_installed", lambda package: False)
    monkeypatch.setattr(setup_services, "unreachable", lambda services, probe=None: [])
    ran = []

    def run(command, check=False):
        ran.append(command)
        assert capsys.readouterr().out.endswith(f"$ {' '.join(command)}\n")  # printed first
        return subprocess.CompletedProcess(command, 0)

    setup_services.install_services([postgres()], run=run)
    assert [c[-3:] for c in ran if "install" in c] == [["install", "-y", "postgresql"]]
    assert ran[-1][-3:] == ["service", "postgresql", "start"]

    with pytest.raises(SystemExit) as stop:
        setup_services.install_services(
            [rabbitmq()], run=lambda c, check=False: subprocess.CompletedProcess(c, 100)
        )
    assert stop.value.code == setup_services.EXIT_SERVICES
    assert "failed (exit code 100)" in capsys.readouterr().err

    monkeypatch.setattr(setup_services, "is_debian", lambda: False)
    with pytest.raises(SystemExit):
        setup_services.install_services([rabbitmq()], run=run)
    assert "Debian or Ubuntu" in capsys.readouterr().err
