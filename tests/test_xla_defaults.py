"""arjax's XLA defaults: added to XLA_FLAGS unless the user set the flag or opted out."""

import os

from arjax import xla_defaults


def test_defaults_are_added_without_touching_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    xla_defaults.apply(env)
    assert env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                "--xla_cpu_experimental_ynn_fusion_type=")
    xla_defaults.apply(env)  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    empty: dict[str, str] = {}
    xla_defaults.apply(empty)
    assert empty == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}


def test_a_flag_the_user_set_or_an_opt_out_wins():
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    xla_defaults.apply(mine)
    assert mine == {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    off = {"ARJAX_XLA_DEFAULTS": "0"}
    xla_defaults.apply(off)
    assert off == {"ARJAX_XLA_DEFAULTS": "0"}


def test_importing_arjax_applied_them_to_this_process():
    assert "--xla_cpu_experimental_ynn_fusion_type=" in os.environ["XLA_FLAGS"]
