"""Policies and adapters arrive through entry points; a third-party package works like a built-in."""

import importlib.metadata
import sys
import textwrap

import pytest
import torch
from models import batch, greedy, tiny_model

import kvpolicy
from kvpolicy import UnknownPolicyError
from kvpolicy.core import registry

PLUGIN_CODE = '''
import kvpolicy
from kvpolicy.policies.budget import BudgetConfig, BudgetPolicy
from pydantic import Field


class KeepOldestConfig(BudgetConfig):
    extra_margin: int = Field(0, ge=0)


class KeepOldest(BudgetPolicy):
    """Keeps the oldest tokens: a policy nobody should use, which makes it easy to check."""

    name = "keep_oldest"
    config_class = KeepOldestConfig

    def scores(self, view):
        return -view.positions.float()


@kvpolicy.hookimpl
def kvpolicy_policies():
    return [KeepOldest]
'''


def install_toy_plugin(tmp_path):
    """Install a tiny package with its own ``kvpolicy.policies`` entry point onto sys.path; returns
    the function that uninstalls it again (idempotent)."""
    (tmp_path / "kvpolicy_toy_plugin.py").write_text(PLUGIN_CODE)
    dist = tmp_path / "kvpolicy_toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvpolicy-toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [kvpolicy.policies]
            toy = kvpolicy_toy_plugin
            """
        )
    )
    sys.path.insert(0, str(tmp_path))
    kvpolicy.reload_plugins()

    def uninstall():
        while str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop("kvpolicy_toy_plugin", None)
        kvpolicy.reload_plugins()

    return uninstall


@pytest.fixture
def third_party_plugin(tmp_path):
    uninstall = install_toy_plugin(tmp_path)
    yield
    uninstall()


def test_builtins_register_through_entry_points():
    groups = importlib.metadata.entry_points()
    names = {ep.value for ep in groups.select(group="kvpolicy.policies")}
    assert "kvpolicy.policies" in names, "pip install -e . registers the built-ins as an entry point"
    assert {ep.value for ep in groups.select(group="kvpolicy.adapters")} >= {"kvpolicy.adapters"}
    pm = registry.plugin_manager()
    assert pm.get_plugin("kvpolicy-builtin-policies") is sys.modules["kvpolicy.policies"]
    assert pm.get_plugin("kvpolicy-builtin-adapters") is sys.modules["kvpolicy.adapters"]


def test_third_party_policy_is_found_and_used(third_party_plugin):
    assert "keep_oldest" in kvpolicy.available_policies()
    cache = kvpolicy.make_cache("keep_oldest", budget=10, sink_size=0, window_size=0, extra_margin=1)
    greedy(tiny_model("llama", "sdpa"), batch([30]), cache, new_tokens=3)
    assert cache.kept_positions(2)[0, 0].tolist() == list(range(10))


def test_plugin_gone_after_uninstall(tmp_path):
    """Installs, sees the policy, uninstalls and checks it is gone, all in this test (any order, or alone)."""
    uninstall = install_toy_plugin(tmp_path)
    try:
        assert "keep_oldest" in kvpolicy.available_policies()
    finally:
        uninstall()
    assert "keep_oldest" not in kvpolicy.available_policies()
    with pytest.raises(UnknownPolicyError, match="keep_oldest"):
        kvpolicy.make_cache("keep_oldest")
    assert "kvpolicy_toy_plugin" not in sys.modules


def test_plugin_absent_without_install():
    assert "keep_oldest" not in kvpolicy.available_policies()


def test_third_party_adapter(tmp_path, monkeypatch):
    from kvpolicy.adapters.base import ModelAdapter

    class Plugin:
        @kvpolicy.hookimpl
        def kvpolicy_adapters(self):
            return [ModelAdapter("renamed", ("renamed_llama",))]

    pm = registry.plugin_manager()
    plugin = Plugin()
    pm.register(plugin)
    try:
        assert "renamed_llama" in kvpolicy.supported_model_types()
        model = tiny_model("llama", "sdpa")
        monkeypatch.setattr(model.config, "model_type", "renamed_llama", raising=False)
        cache = kvpolicy.make_cache("h2o", budget=5)
        with torch.no_grad():
            model(**batch([12]), past_key_values=cache)
        assert cache.valid_tokens_per_layer()[0] == [5]
    finally:
        pm.unregister(plugin)


def test_broken_plugin_warns_and_the_rest_still_works(tmp_path):
    dist = tmp_path / "kvpolicy_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvpolicy-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kvpolicy.policies]\nbroken = no_such_module_anywhere\n")
    sys.path.insert(0, str(tmp_path))
    kvpolicy.reload_plugins()
    try:
        with pytest.warns(RuntimeWarning, match="broken.*failed to load"):
            names = kvpolicy.available_policies()
        assert "pyramidinfer" in names
    finally:
        sys.path.remove(str(tmp_path))
        kvpolicy.reload_plugins()
