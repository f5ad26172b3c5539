"""[identity], [[identity.oidc]] and the targets' allow_users/allow_groups/cert_user keys."""

from __future__ import annotations

from pathlib import Path

from config import load_config

from .support import MINIMAL, problems_of, write_config

F = "dbgrelay.toml"

ENTRA = """
[identity]
admin_groups = ["dbg-admins"]

[identity.group_targets]
"firmware" = ["build*", "lab1"]

[[identity.oidc]]
issuer = "https://login.microsoftonline.com/11111111-2222-3333-4444-555555555555/v2.0"
audience = ["api://dbgrelay", "6a8b0c1d-0000-4000-8000-000000000001"]
algorithms = ["RS256"]
user_claim = "preferred_username"
groups_claim = "groups"
refresh_interval = "30m"
unknown_kid_cooldown = "1m"
max_staleness = "12h"
fetch_timeout = "5s"
"""


def test_a_full_identity_section_loads(config_dir: Path) -> None:
    target = """
[[targets]]
name = "build42"
kind = "gdbserver"
backend = "tcp://127.0.0.1:5005"
allow_users = ["alice"]
allow_groups = ["firmware"]
"""
    config = load_config(write_config(config_dir, MINIMAL + ENTRA + target))
    (oidc,) = config.identity.oidc
    assert oidc.issuer.endswith("/v2.0")
    assert oidc.audience == ("api://dbgrelay", "6a8b0c1d-0000-4000-8000-000000000001")
    assert oidc.algorithms == ("RS256",)
    assert (oidc.user_claim, oidc.groups_claim) == ("preferred_username", "groups")
    assert (oidc.refresh_interval, oidc.unknown_kid_cooldown) == (1800.0, 60.0)
    assert (oidc.max_staleness, oidc.fetch_timeout, oidc.ca) == (43200.0, 5.0, None)
    assert config.identity.group_targets == (("firmware", ("build*", "lab1")),)
    assert config.identity.admin_groups == ("dbg-admins",)
    (t,) = config.targets
    assert (t.allow, t.allow_groups, t.cert_user) == (("alice",), ("firmware",), None)


def test_defaults(config_dir: Path) -> None:
    text = MINIMAL + '[[identity.oidc]]\nissuer = "https://idp.example/realms/x"\naudience = "d"\n'
    (oidc,) = load_config(write_config(config_dir, text)).identity.oidc
    assert oidc.audience == ("d",)
    assert oidc.algorithms == ("RS256", "ES256")
    assert (oidc.user_claim, oidc.groups_claim) == ("sub", "groups")
    assert (oidc.refresh_interval, oidc.unknown_kid_cooldown) == (3600.0, 300.0)
    assert (oidc.max_staleness, oidc.fetch_timeout) == (86400.0, 10.0)
    assert load_config(write_config(config_dir, MINIMAL)).identity.oidc == ()


def test_the_older_allow_key_still_means_users(config_dir: Path) -> None:
    target = (
        '[[targets]]\nname = "a"\nkind = "tcp"\nbackend = "tcp://127.0.0.1:1"\nallow = ["bob"]\n'
    )
    (t,) = load_config(write_config(config_dir, MINIMAL + target)).targets
    assert t.allow == ("bob",) and t.allows("bob") and not t.allows("eve")
    (line,) = problems_of(config_dir, MINIMAL + target + 'allow_users = ["bob"]\n')
    assert (
        line
        == f"{F}: targets[0].allow: allow and allow_users are the same list; keep only allow_users"
    )


def test_unsafe_or_wrong_values_are_refused_each_on_one_line(config_dir: Path) -> None:
    text = (
        MINIMAL
        + """
[[identity.oidc]]
issuer = "http://idp.example/realms/x"
algorithms = ["HS256"]
user_claim = "name"
max_staleness = "0s"
colour = "blue"

[[identity.oidc]]
issuer = "https://idp.example/realms/y"
audience = []
algorithms = ["none"]

[[targets]]
name = "a"
kind = "tcp"
backend = "tcp://127.0.0.1:1"
cert_user = "cn"
allow_groups = "firmware"
"""
    )
    lines = problems_of(config_dir, text)
    expected = [
        "identity.oidc[0].colour: unknown key",
        "identity.oidc[0].issuer: expected an https:// URL",
        "identity.oidc[0].audience: required key is missing",
        'identity.oidc[0].algorithms: expected a list of "RS256", "ES256" or "EdDSA" (never "none" or HMAC)',
        'identity.oidc[0].user_claim: expected "sub" or "email" or "preferred_username" or "upn"',
        "identity.oidc[0].max_staleness:",
        "identity.oidc[1].audience: name at least one audience",
        "identity.oidc[1].algorithms:",
        "targets[0].allow_groups: expected a list of names",
        "targets[0].cert_user: needs tls.client_ca",
    ]
    for want in expected:
        assert any(line.startswith(f"{F}: {want}") for line in lines), (want, lines)
    assert len(lines) == len(expected), lines


def test_group_targets_must_be_lists_of_globs(config_dir: Path) -> None:
    (line,) = problems_of(config_dir, MINIMAL + '[identity.group_targets]\nfw = "build*"\n')
    assert line.startswith(f"{F}: identity.group_targets.fw: expected a list of names")
