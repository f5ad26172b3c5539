"""The account keys: relay.user, relay.run_as, targets' run_as, admin.users and admin.groups."""

from __future__ import annotations

from pathlib import Path

from config import load_config

from .support import MINIMAL, problems_of, write_config

F = "dbgrelay.toml"
MANAGED = """
[[targets]]
name = "t"
kind = "gdbserver"
backend = "tcp://127.0.0.1:{port}"
launch = ["gdbserver", "--once", "127.0.0.1:{port}", "/bin/true"]
"""


def test_defaults_run_targets_as_dbgrelay_target_and_admit_no_extra_accounts(config_dir: Path):
    write_config(config_dir, MINIMAL + MANAGED)
    config = load_config(Path(F))
    assert config.relay.user is None
    assert config.relay.run_as == "dbgrelay-target"
    assert config.run_as(config.targets[0]) == "dbgrelay-target"
    assert (config.admin.users, config.admin.groups) == ((), ())


def test_a_target_run_as_overrides_the_relay_wide_one(config_dir: Path):
    text = '[relay]\nuser = "dbgrelay"\nrun_as = "debug-a"\n' + MINIMAL + MANAGED
    text += 'run_as = "debug-b"\n[admin]\nusers = ["alice"]\ngroups = ["ops"]\n'
    write_config(config_dir, text)
    config = load_config(Path(F))
    assert (config.relay.user, config.relay.run_as) == ("dbgrelay", "debug-a")
    assert config.run_as(config.targets[0]) == "debug-b"
    assert (config.admin.users, config.admin.groups) == (("alice",), ("ops",))


def test_bad_account_names_are_one_line_each(config_dir: Path):
    text = '[relay]\nuser = ""\nrun_as = 7\n' + MINIMAL + MANAGED + 'run_as = "a b"\n'
    text += '[admin]\nusers = "alice"\ngroups = ["ops", "-x"]\n'
    assert problems_of(config_dir, text) == [
        f'{F}: relay.user: expected an account name like "dbgrelay-target", got ""',
        f'{F}: relay.run_as: expected an account name like "dbgrelay-target", got 7',
        f'{F}: admin.users: expected a list of names like ["alice", "ops"], got "alice"',
        f'{F}: admin.groups: expected a list of names like ["alice", "ops"], got ["ops", "-x"]',
        f'{F}: targets[0].run_as: expected an account name like "dbgrelay-target", got "a b"',
    ]
