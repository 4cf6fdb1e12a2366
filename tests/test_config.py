"""The settings table in config.py: the Config it builds, the bounds it enforces, the documents printed from it.

docs/configuration.md's settings table and .env.example must be exactly what `python config.py --markdown` and
`--env-example` print; every setting refuses a bad value with a ConfigError naming it, and
`python server.py` turns that into one line and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

import config as config_module
from config import DEFAULTS, SETTINGS, Config, ConfigError, Setting, load

BY_NAME = {s.name: s for s in SETTINGS}
NUMERIC = [s for s in SETTINGS if s.kind.bounds is not None]
# Settings a value at one end of its range would push past a cross-setting check, and what keeps them clear.
ROOMY = {
    "MAX_MESSAGE_BYTES": {"SEND_QUEUE_BYTES": str(2**30)},
    "SEND_QUEUE_BYTES": {"MAX_MESSAGE_BYTES": "256"},
    "PRE_DRAIN_DELAY": {"SHUTDOWN_GRACE": "600"},
    "SHUTDOWN_GRACE": {"PRE_DRAIN_DELAY": "0"},
    "AUTH_LEEWAY": {"AUTH_JWT_SECRET": "k" * 32},  # only with authentication on
    "AUTH_TIMEOUT": {"AUTH_JWT_SECRET": "k" * 32},
}
# A refused value of every setting that is not numeric, flag, choice or rate (those are derived from their kind).
BAD_TEXT = {
    "HOST": "local host",
    "ALLOWED_ORIGINS": "app.example.com",
    "TRUSTED_PROXIES": "10.0.0.0/33",
    "REDIS_URL": "http://redis:6379",
    "DATABASE_URL": "mysql://root:hunter2@db/x",
    "LOG_FILE": "/",
    "HASH_KEY": "too short",
    "METRICS_TOKEN": "too short",
    "METRICS_ADDRESS": "9464",
    "AUTH_JWT_SECRET": "shorter than 32 characters",
    "AUTH_JWKS_URL": "ftp://keys.example.com/jwks.json",
    "SUPABASE_URL": "https://abcdefgh.supabase.co/auth/v1",
    "AUTH_ISSUER": "https://issuer example",
    "MOTD": "a bell \a",
    "ADMIN_TOKEN": "too short",
    "SMTP_URL": "smtp://user:hunter2@mail.example.com:99999",
    "EMAIL_FROM": "Tandem <invites@example.com>, other@example.com",
    "PUBLIC_URL": "https://pair.example.com/#code",
}
ACCEPTS_ANYTHING = {"DATA_DIR", "AUTH_AUDIENCE"}  # any text is a path; any list of audiences


def refuse(env: dict[str, str], name: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(env, dotenv=None)
    assert caught.value.name == name, caught.value
    assert "\n" not in str(caught.value)
    return caught.value


def bad_value(s: Setting) -> str:
    if s.kind.bounds is not None:
        return str(s.kind.bounds[1] * 2 + 1)
    return {"flag": "2", "choice": "none of these", "rate": "10"}.get(s.kind.unit) or BAD_TEXT[s.name]


def just_outside(s: Setting) -> list[str]:
    assert s.kind.bounds is not None
    low, high = s.kind.bounds
    if s.kind.unit == "seconds":
        return [repr(math.nextafter(low, -math.inf)), repr(math.nextafter(high, math.inf))]
    return [str(int(low) - 1), str(int(high) + 1)]


# --- one table -----------------------------------------------------------------------------------


def test_every_config_field_has_exactly_one_entry_and_every_entry_a_field() -> None:
    assert [s.field for s in SETTINGS] == [f.name for f in dataclasses.fields(Config)]
    assert len(BY_NAME) == len(SETTINGS) == len(dataclasses.fields(Config))
    for s in SETTINGS:
        assert s.name == s.field.upper() and s.doc and s.kind.unit and s.kind.allowed, s
        assert s.default == getattr(DEFAULTS, s.field), s.name
        assert "|" not in s.meaning() and "\n" not in s.meaning(), f"{s.name}'s doc would break the table"
    assert SETTINGS[0].section, "the first setting must start a section of .env.example"


def test_docs_table_and_env_example_are_generated_from_the_table() -> None:
    def printed(option: str) -> str:
        command = [sys.executable, "config.py", option]
        return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=30).stdout

    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    block = re.search(r"^<!-- settings:begin -->\n(.*?)^<!-- settings:end -->$", page, re.DOTALL | re.MULTILINE)
    assert block is not None, "docs/configuration.md lacks the <!-- settings:begin --> / <!-- settings:end --> markers"
    stale = "docs/configuration.md's table is stale: paste `python config.py --markdown`"
    assert block.group(1) == printed("--markdown"), stale
    env_example = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert env_example == printed("--env-example"), "stale: run `python config.py --env-example > .env.example`"
    assert re.findall(r"^([A-Z][A-Z0-9_]+)=", env_example, re.MULTILINE) == list(BY_NAME)


def test_env_example_loads_to_the_defaults_and_each_default_reads_back() -> None:
    assert load({}, dotenv=ROOT / ".env.example") == DEFAULTS
    assert load({}, dotenv=None) == DEFAULTS == Config()
    for s in SETTINGS:
        shown = s.kind.show(s.default)
        assert s.read({s.name: shown} if shown else {}) == s.default, s.name


# --- bounds and bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize("s", NUMERIC, ids=lambda s: s.name)
def test_numeric_bounds_are_enforced(s: Setting) -> None:
    assert s.kind.bounds is not None
    for outside in just_outside(s):
        refuse({s.name: outside}, s.name)
    for bound in s.kind.bounds:
        inside = str(int(bound) if s.kind.unit != "seconds" else bound)
        config = load({s.name: inside, **ROOMY.get(s.name, {})}, dotenv=None)
        assert getattr(config, s.field) == bound


def test_rate_bounds_are_enforced() -> None:
    rates = [s for s in SETTINGS if s.kind.unit == "rate"]
    assert len(rates) == 8
    for s in rates:
        for value, expected in (("1/0.001", (1, 0.001)), ("1000000/86400", (1_000_000, 86400.0)), ("off", None)):
            assert getattr(load({s.name: value}, dotenv=None), s.field) == expected
        for value in ("0/60", "1000001/60", "1/0.0009", "1/86400.5", "10", "10/", "ten/60", "10/nan"):
            refuse({s.name: value}, s.name)


def test_every_setting_refuses_a_bad_value_naming_it() -> None:
    assert set(BAD_TEXT) | ACCEPTS_ANYTHING <= set(BY_NAME)
    for s in SETTINGS:
        if s.name not in ACCEPTS_ANYTHING:
            error = refuse({s.name: bad_value(s)}, s.name)
            assert f"invalid setting {s.name}=" in str(error) and ": expected " in str(error)
    assert "hunter2" not in str(refuse({"DATABASE_URL": "postgresql://u:hunter2@db:99999/x"}, "DATABASE_URL"))


def test_cross_setting_checks() -> None:
    refuse({"REDIS_CLUSTER": "1"}, "REDIS_CLUSTER")
    refuse({"PRE_DRAIN_DELAY": "5.5", "SHUTDOWN_GRACE": "10"}, "PRE_DRAIN_DELAY")
    refuse({"MAX_MESSAGE_BYTES": "600000"}, "SEND_QUEUE_BYTES")
    config = load({"PRE_DRAIN_DELAY": "5", "MAX_MESSAGE_BYTES": str(2**19)}, dotenv=None)
    assert (config.pre_drain_delay, config.send_queue_bytes) == (5.0, 2**20)


# The settings e-mail invitations need, all in force.
EMAIL = {
    "SMTP_URL": "smtps://invites%40example.com:hunter2@mail.example.com",
    "EMAIL_FROM": "Tandem <invites@example.com>",
    "PUBLIC_URL": "https://pair.example.com/",
}


def test_email_settings_and_their_combinations() -> None:
    config = load(EMAIL, dotenv=None)
    assert config.public_url == "https://pair.example.com" and config.email_from == "Tandem <invites@example.com>"
    assert config.rate_limit_email_session == (5, 86400.0) and config.rate_limit_email_recipient == (3, 86400.0)
    for missing in ("EMAIL_FROM", "PUBLIC_URL"):
        assert "SMTP_URL is set" in str(refuse({**EMAIL, missing: ""}, missing))
    # E-mail is never sent unlimited: neither all limits off, nor one of its own.
    refuse({**EMAIL, "RATE_LIMIT_ENABLED": "0"}, "RATE_LIMIT_ENABLED")
    for name in ("RATE_LIMIT_API_IP", "RATE_LIMIT_EMAIL_SESSION", "RATE_LIMIT_EMAIL_RECIPIENT"):
        refuse({**EMAIL, name: "off"}, name)
    assert load({"RATE_LIMIT_ENABLED": "0", "RATE_LIMIT_EMAIL_SESSION": "off"}, dotenv=None).smtp_url is None
    for bad in (
        "http://mail.example.com",
        "smtp://",
        "smtp://mail.example.com/path",
        "smtp://mail.example.com?tls=0",
        "smtp://mail example.com",
    ):
        refuse({"SMTP_URL": bad}, "SMTP_URL")
    injected = "Bob <a@example.com>\r\nBcc: x@example.com"
    for bad in ("invites", "a@b", "<invites@example.com", injected, "a,b@example.com"):
        refuse({"EMAIL_FROM": bad}, "EMAIL_FROM")
    for bad in ("pair.example.com", "ftp://pair.example.com", "https://pair.example.com/?x=1", "https://"):
        refuse({"PUBLIC_URL": bad}, "PUBLIC_URL")
    assert "hunter2" not in str(refuse({"SMTP_URL": "smtp://u:hunter2@mail.example.com:99999"}, "SMTP_URL"))


def test_values_are_normalised_and_secrets_stay_out_of_repr() -> None:
    env = {
        "LOG_LEVEL": "debug",
        "LOG_FORMAT": "JSON",
        "SQLITE_SYNCHRONOUS": "normal",
        "ALLOWED_ORIGINS": "https://A.example.com/, https://b.example.com",
        "TRUSTED_PROXIES": "10.1.2.3/8, ::1",
        "REDIS_CLUSTER": "yes",
        "REDIS_URL": "redis://r:6379",
        "DATABASE_URL": "postgresql://u:hunter2@db/x",
        "HASH_KEY": "0123456789abcdef-key",
        "METRICS_TOKEN": "0123456789abcdef-token",
        "ADMIN_TOKEN": "0123456789abcdef-admin",
        **EMAIL,
    }
    config = load(env, dotenv=None)
    assert (config.log_level, config.log_format, config.sqlite_synchronous) == ("DEBUG", "json", "NORMAL")
    assert config.allowed_origins == ("https://a.example.com", "https://b.example.com")
    assert config.trusted_proxies == ("10.0.0.0/8", "::1/128") and config.redis_cluster
    assert load({"ALLOWED_ORIGINS": "https://a.example.com, *"}, dotenv=None).allowed_origins == ()
    assert not re.search(r"hunter2|-key|-token|-admin", repr(config))


def test_dotenv_is_read_under_the_environment(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("# comment\nexport PORT='4000'\nHOST=127.0.0.1\nLOG_LEVEL=\n", encoding="utf-8")
    config = load({"HOST": "::1"}, dotenv=dotenv)
    assert (config.port, config.host, config.log_level) == (4000, "::1", "INFO")
    dotenv.write_text("PORT\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\.env:1"):
        load({}, dotenv=dotenv)


# --- the server -----------------------------------------------------------------------------------------


def test_server_exits_2_with_one_line_naming_a_bad_setting(tmp_path: Path) -> None:
    cases = {
        "PORT": {"PORT": "abc"},
        "RATE_LIMIT_API_IP": {"RATE_LIMIT_API_IP": "10"},
        "DATABASE_URL": {"DATABASE_URL": "mysql://root:hunter2@db/x"},
        "LOG_LEVEL": {"LOG_LEVEL": "loud"},
        "PRE_DRAIN_DELAY": {"PRE_DRAIN_DELAY": "6", "SHUTDOWN_GRACE": "10"},
        "EMAIL_FROM": {"SMTP_URL": "smtp://u:hunter2@127.0.0.1:1", "PUBLIC_URL": "https://pair.example.com"},
    }
    clean = {k: v for k, v in os.environ.items() if k not in BY_NAME}
    runs = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "server.py")],
            cwd=tmp_path,
            env=clean | settings,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, settings in cases.items()
    }
    for name, process in runs.items():
        stdout, stderr = process.communicate(timeout=30)
        assert process.returncode == 2, (name, stdout, stderr)
        assert stdout == "" and stderr.count("\n") == 1, (name, stderr)
        assert stderr.startswith(f"tandem: invalid setting {name}="), stderr
        assert "hunter2" not in stderr


def test_config_module_prints_usage_without_an_option() -> None:
    result = subprocess.run([sys.executable, config_module.__file__], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--markdown" in result.stderr
