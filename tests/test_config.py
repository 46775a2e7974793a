"""AppConfig validation and catalog building (no Ray cluster needed)."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import yaml

from graph import ConfigError, build_catalog, load_config
from policies.config import ModelEntry, deployment_name


def config(**overrides):
    args = {"models": [{"id": "a", "path": "models/tiny-llama"}], **overrides}
    return load_config(args)


def test_defaults_are_sane():
    cfg = config()
    assert cfg.memory_limit == "75%"
    assert cfg.image_max_side == 2048
    assert cfg.admin_api_key is None
    assert cfg.models[0].pinned is False
    assert cfg.models[0].memory is None
    # Sizes are bytes and durations seconds once validated, defaults included.
    assert cfg.max_request_size == 32_000_000
    assert (cfg.lease_ttl, cfg.request_body_timeout, cfg.load_wait_timeout) == (20.0, 30.0, 60.0)
    assert (cfg.prompt_cache_dir, cfg.prompt_cache_disk) == ("~/.cache/mlx-fleet/prompt-cache", 2 * 10**9)
    assert config(prompt_cache_disk=None).prompt_cache_disk is None  # nothing saved
    assert config(idle_ttl="5m", image_max_bytes="1 MiB").idle_ttl == 300.0
    assert config(image_max_bytes="1 MiB").image_max_bytes == 2**20


def test_full_model_spec():
    cfg = config(
        models=[
            {"id": "org/m", "path": "x", "pinned": True, "memory": "2GB", "type": "text-generation", "family": "qwen"}
        ],
        memory_limit="24 GiB",
        admin_api_key="secret",
    )
    spec = cfg.models[0]
    assert (spec.pinned, spec.memory, spec.type, spec.family) == (True, 2_000_000_000, "text-generation", "qwen")


@pytest.mark.parametrize(
    "args, words",
    [
        ({"models": []}, "at least 1"),
        ({"models": [{"id": "a", "path": "p", "colour": "red"}]}, "colour"),
        ({"modles": []}, "modles"),
        ({"models": [{"id": "a", "path": "p"}], "memory_limit": "lots"}, "memory_limit"),
        ({"models": [{"id": "a", "path": "p"}], "memory_limit": "150%"}, "(0, 100]"),
        ({"models": [{"id": "a", "path": "p", "memory": "2 parsecs"}]}, "2 parsecs"),
        ({"models": [{"id": "a", "path": "p"}, {"id": "a", "path": "q"}]}, "collide"),
        ({"models": [{"id": "org/x", "path": "p"}, {"id": "org--x", "path": "q"}]}, "collide"),
        ({"models": [{"id": "fleet-ingress", "path": "p"}]}, "reserved"),
        ({"models": [{"id": " a", "path": "p"}]}, "surrounding spaces"),
        ({"models": [{"id": "a", "path": "p"}], "image_max_side": 0}, "image_max_side"),
        ({"models": [{"id": "a", "path": "p"}], "admin_api_key": ""}, "admin_api_key"),
        ({"models": [{"id": "a", "path": "p"}], "admin_api_key": "   "}, "admin_api_key"),
        ({"models": [{"id": "a", "path": "p"}], "admin_api_key": "clé"}, "admin_api_key"),
        ({"models": [{"id": "a", "path": "p"}], "lease_ttl": "0s"}, "lease_ttl"),
        ({"models": [{"id": "a", "path": "p"}], "request_body_timeout": "soon"}, "request_body_timeout"),
        ({"models": [{"id": "a", "path": "p", "node": "b"}]}, "names node 'b', which is not in `nodes`"),
        ({"models": [{"id": "a", "path": "p"}], "nodes": [{"name": "m"}, {"name": "m"}]}, "unique"),
        ({"models": [{"id": "a", "path": "p"}], "nodes": [{"name": "a@b"}]}, "name"),
        ({"models": [{"id": "a", "path": "p"}], "nodes": [{"name": "m", "memory_limit": "9 zorks"}]}, "9 zorks"),
        ({"models": [{"id": "l", "path": "p", "base": "x"}]}, "an adapter of 'x', which is not in `models`"),
        ({"models": [{"id": "a", "path": "p"}, {"id": "l", "path": "q", "base": "a"}, {"id": "m", "path": "r", "base": "l"}]},
         "which is an adapter itself"),
        ({"models": [{"id": "a", "path": "p"}, {"id": "l", "path": "q", "base": "a", "max_context": 9}]},
         "runs where its base runs"),
        ({"models": [{"id": "a", "path": "p"}, {"id": "l", "path": "q", "base": "a", "speculative": False}]},
         "runs where its base runs"),
        ({"models": [{"id": "a", "path": "p", "speculative": "draft"}]}, "speculative"),
        ({"models": [{"id": "a", "path": "p", "draft": "b"}]}, "its draft 'b' is not in `models`"),
        ({"models": [{"id": "a", "path": "p", "draft": "a"}]}, "must be another model"),
        ({"models": [{"id": "a", "path": "p", "draft": "b", "speculative": False}, {"id": "b", "path": "q"}]},
         "a draft speculates"),
        ({"models": [{"id": "a", "path": "p"}, {"id": "l", "path": "q", "base": "a", "draft": "a"}]},
         "runs where its base runs"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(args, words):
    with pytest.raises(ConfigError) as error:
        load_config(args)
    assert words in str(error.value)
    assert "invalid mlx-fleet config" in str(error.value)


def test_deployment_names_are_url_safe():
    assert deployment_name("mlx-community/Qwen2.5-0.5B-Instruct-4bit") == "mlx-community--Qwen2.5-0.5B-Instruct-4bit"
    assert deployment_name("my model:v1") == "my-model-v1"


def test_each_model_gets_a_deployment_per_node_it_may_use():
    cfg = config(
        nodes=[{"name": "studio"}, {"name": "mini", "labels": {"rack": "2"}}],
        models=[{"id": "org/m", "path": "x"}, {"id": "big", "path": "y", "node": "studio"}],
    )
    assert cfg.node_names == ["studio", "mini"]
    assert [node.selector for node in cfg.nodes] == [{"mlx-fleet/node": "studio"}, {"rack": "2"}]
    assert config().node_names == ["local"]
    entry = ModelEntry(
        id="org/m", deployment="org--m", path="x", type="text-generation", family="llama",
        pinned=False, memory_bytes=None,
    )
    assert entry.placements(cfg.node_names) == {"studio": "org--m@studio", "mini": "org--m@mini"}
    assert replace(entry, node="studio").placements(cfg.node_names) == {"studio": "org--m@studio"}
    assert entry.placements(["local"]) == {"local": "org--m"}  # one node: the model's own name


def write_model(directory, config_json):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config_json))
    return str(directory)


def test_catalog_resolves_local_dirs_and_detects_family(tmp_path):
    path = write_model(tmp_path / "m", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    (entry,) = build_catalog(config(models=[{"id": "q", "path": path, "memory": "1GB"}]))
    assert entry.path == path
    assert (entry.type, entry.family) == ("text-generation", "qwen")
    assert entry.memory_bytes == 1_000_000_000
    assert entry.deployment == "q"


def test_text_models_speculate_by_prompt_lookup_unless_told_not_to(tmp_path):
    path = write_model(tmp_path / "m", {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]})
    default, off = build_catalog(
        config(models=[{"id": "q", "path": path}, {"id": "r", "path": path, "speculative": False}])
    )
    assert (default.speculative, off.speculative) == ("prompt_lookup", None)


def test_a_draft_shares_the_vocabulary_and_is_charged_to_the_model_it_drafts_for(demo_models):
    from policies.memory import estimate_entry_bytes, weight_files_bytes

    llama, agent = str(demo_models / "bench-llama-20m"), str(demo_models / "tiny-agent")
    drafted, draft = build_catalog(
        config(models=[{"id": "m", "path": llama, "draft": "d"}, {"id": "d", "path": str(demo_models / "tiny-llama")}])
    )
    assert (drafted.draft, drafted.draft_path, drafted.speculative) == ("d", draft.path, "prompt_lookup")
    assert estimate_entry_bytes(drafted, 100) == weight_files_bytes(llama) + weight_files_bytes(draft.path) + 100
    with pytest.raises(ConfigError, match="another vocabulary"):
        build_catalog(config(models=[{"id": "m", "path": llama, "draft": "d"}, {"id": "d", "path": agent}]))


def test_config_overrides_detection(tmp_path):
    path = write_model(tmp_path / "m", {"model_type": "qwen2"})
    (entry,) = build_catalog(config(models=[{"id": "q", "path": path, "family": "gemma"}]))
    assert entry.family == "gemma"


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is neither a model directory nor a .gguf file"):
        build_catalog(config(models=[{"id": "q", "path": str(tmp_path / "nope")}]))


def test_hub_id_missing_from_cache_asks_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the local hub cache.*allow_download"):
        build_catalog(config(models=[{"id": "q", "path": "mlx-community/not-here"}]))


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.mac.example.yaml"])
def test_shipped_configs_are_valid(name):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from tests.conftest import ROOT

    document = yaml.safe_load((ROOT / name).read_text())
    ServeDeploySchema.model_validate(document)
    (application,) = document["applications"]
    # What the tests and benchmarks deploy is what the shipped configs declare.
    from graph import application_config

    expected = application_config(application["args"], application["name"], application["route_prefix"])
    assert {key: application[key] for key in expected} == expected
    load_config(application["args"])


def test_a_type_no_deployment_serves_is_a_clear_error(tmp_path):
    path = write_model(tmp_path / "m", {"model_type": "llama"})
    with pytest.raises(ConfigError, match="audio-magic model.*cannot serve; set `type:` to one of: text-generation"):
        build_catalog(config(models=[{"id": "q", "path": path, "type": "audio-magic"}]))


def test_api_keys_are_validated_and_may_come_from_a_file(tmp_path):
    import hashlib

    from policies.api_keys import KeyRing, presented_key

    listed = [{"name": "a", "key": "k1", "models": ["tiny-*"]}, {"name": "b", "key_sha256": hashlib.sha256(b"k2").hexdigest()}]
    path = tmp_path / "keys.yaml"
    path.write_text(yaml.safe_dump(listed))
    for given in (listed, str(path)):
        ring = KeyRing([spec.to_key() for spec in config(api_keys=given).api_keys])
        assert ring.find(b"k1").name == "a" and ring.find(b"k2").name == "b"
        assert ring.find(b"k3") is None and ring.find(None) is None
        assert ring.find(b"k1").allows("tiny-llama") and not ring.find(b"k1").allows("smollm2")
    assert presented_key("Bearer k1", None) == b"k1" and presented_key(None, "k2") == b"k2"
    assert presented_key("Basic k1", None) is None and presented_key("Bearer ключ".encode().decode("latin-1"), None)
    for bad, words in (
        ([{"name": "a"}], "exactly one of `key` and `key_sha256`"),
        ([{"name": "a", "key": "x", "key_sha256": "0" * 64}], "exactly one"),
        ([{"name": "a", "key_sha256": "xyz"}], "key_sha256"),
        ([{"name": "a", "key": "x"}, {"name": "a", "key": "y"}], "a key of its own"),
        ([{"name": "a", "key": "x"}, {"name": "b", "key": "x"}], "a key of its own"),
        (str(tmp_path / "missing.yaml"), "cannot read"),
    ):
        with pytest.raises(ConfigError, match=re.escape(words)):
            config(api_keys=bad)


def test_an_adapter_takes_its_bases_deployment_and_features(demo_models, tmp_path):
    models = [
        {"id": "base", "path": str(demo_models / "tiny-llama")},
        {"id": "lora", "path": str(demo_models / "tiny-llama-lora-a"), "base": "base"},
    ]
    base, lora = build_catalog(config(models=models))
    assert (lora.deployment, lora.type, lora.family, lora.context_length) == (
        base.deployment, base.type, base.family, base.context_length)
    assert (lora.base, lora.path) == ("base", str(demo_models / "tiny-llama-lora-a"))
    with pytest.raises(ConfigError, match="has no adapter_config.json"):
        build_catalog(config(models=[models[0], {**models[1], "path": str(tmp_path)}]))
    with pytest.raises(ConfigError, match="adapters apply to text models"):
        build_catalog(config(models=[{"id": "base", "path": str(demo_models / "all-MiniLM-L6-v2")}, models[1]]))
