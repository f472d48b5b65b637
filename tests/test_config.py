"""Tests for kvtier.config.KVTierConfig: defaults, YAML, KVTIER_* variables, precedence, sizes,
validation errors (key, value, allowed, source), unknown keys, round trips, and a real KVCache
built from cache_kwargs()."""

from __future__ import annotations

import copy
import dataclasses
import os
import pathlib
import pickle
import sys
import textwrap

import pytest
from kvtier.config import (
    CONFIG_FILE_ENV,
    ENV_VARS,
    CpuConfig,
    KVTierConfig,
    PeersSection,
    config_keys,
    parse_size,
)
from kvtier.errors import InvalidArgumentError, UnavailableError

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
GiB = 1 << 30


def write_yaml(tmp_path, text: str) -> str:
    path = tmp_path / "kvtier.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


# -- defaults ------------------------------------------------------------------------------------
def test_defaults():
    cfg = KVTierConfig.load(env={})
    assert cfg == KVTierConfig()
    assert cfg.cpu.bytes == GiB and cfg.cpu.method == "auto" and cfg.cpu.threads == 2
    assert cfg.cpu.eviction_policy == "lru"
    assert cfg.disk.dir is None and cfg.disk.backend == "auto" and cfg.disk.queue_depth == 32
    assert cfg.gpu.pool_pages is None and cfg.gpu.bytes is None and cfg.gpu.page_tokens == 16
    assert cfg.model.model_id == "default" and cfg.model.tenant_salt is None
    assert cfg.model.chunk_tokens == 256
    assert cfg.planner.enabled is True and cfg.planner.cpu_bandwidth_gbps is None
    assert cfg.metrics.prometheus_port is None and cfg.metrics.namespace == "kvtier"
    assert dict(cfg.peers) == {
        "listen": None,
        "seeds": (),
        "secret_file": None,
        "tls_cert_file": None,
        "tls_key_file": None,
        "tls_ca_file": None,
    }
    assert cfg.timeout_s == 30.0


def test_defaults_agree_with_cache_config():
    from kvtier.cache import CacheConfig

    assert KVTierConfig().cache_kwargs() == dataclasses.asdict(CacheConfig())


def test_config_is_frozen():
    cfg = KVTierConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.timeout_s = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.cpu.bytes = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.peers.listen = "a:1"
    with pytest.raises(TypeError):
        cfg.peers["listen"] = "a:1"


# -- sources -------------------------------------------------------------------------------------
def test_yaml_file(tmp_path):
    disk_dir = tmp_path / "nvme"
    disk_dir.mkdir()
    path = write_yaml(
        tmp_path,
        f"""
        cpu:
          bytes: 8GiB
          method: staged
          staging_bytes: 64MiB
          threads: 4
          eviction_policy: s3fifo
        disk:
          dir: {disk_dir}
          bytes: 1.5TB
          backend: posix
          admit_min_seen: 1
          queue_depth: 64
          io_timeout_s: 2.5
          deterministic_writeback: true
        gpu:
          pool_pages: 4096
          page_tokens: 32
        model:
          model_id: meta-llama/Llama-3.1-8B
          tenant_salt: tenant-a
          chunk_tokens: 512
        planner:
          enabled: false
          gpu_prefill_tokens_per_s: 20000
          disk_bandwidth_gbps: 6.5
        metrics:
          prometheus_port: 9400
          namespace: kv
        peers:
          listen: 0.0.0.0:7400
          seeds: [10.0.0.1:7400, "10.0.0.2:7400"]
          secret_file: /etc/kvtier/secret
        timeout_s: 5
        """,
    )
    cfg = KVTierConfig.load(path, env={})
    assert cfg.cpu == CpuConfig(
        bytes=8 * GiB, method="staged", staging_bytes=64 << 20, threads=4, eviction_policy="s3fifo"
    )
    assert cfg.disk.dir == str(disk_dir) and cfg.disk.bytes == 1_500_000_000_000
    assert cfg.disk.backend == "posix" and cfg.disk.admit_min_seen == 1
    assert cfg.disk.queue_depth == 64 and cfg.disk.io_timeout_s == 2.5
    assert cfg.disk.deterministic_writeback is True
    assert cfg.cache_kwargs()["deterministic_writeback"] is True
    assert cfg.gpu.pool_pages == 4096 and cfg.gpu.page_tokens == 32
    assert cfg.model.model_id == "meta-llama/Llama-3.1-8B" and cfg.model.tenant_salt == "tenant-a"
    assert cfg.model.chunk_tokens == 512
    assert cfg.planner.enabled is False and cfg.planner.gpu_prefill_tokens_per_s == 20000.0
    assert cfg.planner.disk_bandwidth_gbps == 6.5 and cfg.planner.cpu_bandwidth_gbps is None
    assert cfg.metrics.prometheus_port == 9400 and cfg.metrics.namespace == "kv"
    assert cfg.peers.listen == "0.0.0.0:7400"
    assert cfg.peers["seeds"] == ("10.0.0.1:7400", "10.0.0.2:7400")
    assert cfg.peers.secret_file == "/etc/kvtier/secret"
    assert cfg.timeout_s == 5.0


def test_empty_yaml_file_and_empty_section_are_defaults(tmp_path):
    assert KVTierConfig.load(write_yaml(tmp_path, ""), env={}) == KVTierConfig()
    assert KVTierConfig.load(write_yaml(tmp_path, "disk:\n"), env={}) == KVTierConfig()


def test_env_vars(tmp_path):
    env = {
        "KVTIER_CPU_BYTES": "8GiB",
        "KVTIER_CPU_METHOD": "CPU",  # choices are case-insensitive
        "KVTIER_CPU_THREADS": "3",
        "KVTIER_DISK_DIR": str(tmp_path),
        "KVTIER_DISK_BYTES": "512MB",
        "KVTIER_DISK_BACKEND": "posix",
        "KVTIER_DISK_IO_TIMEOUT_S": "0.5",
        "KVTIER_DISK_DETERMINISTIC_WRITEBACK": "on",
        "KVTIER_GPU_BYTES": "2gib",
        "KVTIER_MODEL_ID": "qwen",
        "KVTIER_MODEL_TENANT_SALT": "t1",
        "KVTIER_PLANNER_ENABLED": "off",
        "KVTIER_PLANNER_CPU_BANDWIDTH_GBPS": "25",
        "KVTIER_PLANNER_PEER_BANDWIDTH_GBPS": "none",
        "KVTIER_METRICS_PROMETHEUS_PORT": "0",
        "KVTIER_PEERS_LISTEN": "[::]:7400",
        "KVTIER_PEERS_SEEDS": "a:1, b:2,",
        "KVTIER_TIMEOUT_S": "12",
        "PATH": "/usr/bin",  # not ours: ignored
        "KVTIER_TEST_DISK_DIR": "/somewhere",  # the test suite's own variable: ignored
    }
    cfg = KVTierConfig.load(env=env)
    assert cfg.cpu.bytes == 8 * GiB and cfg.cpu.method == "cpu" and cfg.cpu.threads == 3
    assert cfg.disk.dir == str(tmp_path) and cfg.disk.bytes == 512_000_000
    assert cfg.disk.backend == "posix" and cfg.disk.io_timeout_s == 0.5
    assert cfg.disk.deterministic_writeback is True
    assert cfg.gpu.bytes == 2 * GiB
    assert cfg.model.model_id == "qwen" and cfg.model.tenant_salt == "t1"
    assert cfg.planner.enabled is False and cfg.planner.cpu_bandwidth_gbps == 25.0
    assert cfg.planner.peer_bandwidth_gbps is None
    assert cfg.metrics.prometheus_port == 0
    assert cfg.peers.listen == "[::]:7400" and cfg.peers.seeds == ("a:1", "b:2")
    assert cfg.timeout_s == 12.0


def test_env_names_follow_section_and_key():
    for dotted, info in config_keys().items():
        expected = "KVTIER_" + dotted.upper().replace(".", "_")
        if dotted == "model.model_id":
            expected = "KVTIER_MODEL_ID"  # not KVTIER_MODEL_MODEL_ID
        assert info["env"] == expected
        assert ENV_VARS[expected] == dotted


def test_empty_env_value_unsets_optional_keys_but_not_the_tenant_salt():
    env = {"KVTIER_DISK_DIR": "", "KVTIER_GPU_POOL_PAGES": "null", "KVTIER_MODEL_TENANT_SALT": ""}
    cfg = KVTierConfig.load(env=env)
    assert cfg.disk.dir is None and cfg.gpu.pool_pages is None
    assert cfg.model.tenant_salt == ""  # an empty salt is a namespace of its own, not "no salt"


def test_load_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("KVTIER_CPU_THREADS", "7")
    assert KVTierConfig.load().cpu.threads == 7


def test_precedence_defaults_yaml_env_overrides(tmp_path):
    path = write_yaml(
        tmp_path,
        """
        cpu: {bytes: 2GiB, threads: 4, method: cpu}
        model: {model_id: from-yaml}
        timeout_s: 7
        """,
    )
    env = {"KVTIER_CPU_BYTES": "3GiB", "KVTIER_MODEL_ID": "from-env"}
    cfg = KVTierConfig.load(path, env=env, model_id="from-kwarg")
    assert cfg.cpu.bytes == 3 * GiB  # env beats YAML
    assert cfg.cpu.threads == 4  # YAML beats the default
    assert cfg.model.model_id == "from-kwarg"  # a keyword beats env
    assert cfg.timeout_s == 7.0
    assert cfg.cpu.staging_bytes == 256 << 20  # nobody set it: the default
    # every override form reaches the same key
    for overrides in ({"cpu_bytes": "5GiB"}, {"cpu": {"bytes": "5GiB"}}, {"cpu.bytes": "5GiB"}):
        assert KVTierConfig.load(path, env=env, **overrides).cpu.bytes == 5 * GiB


def test_config_file_named_by_env(tmp_path):
    path = write_yaml(tmp_path, "cpu: {threads: 9}\n")
    assert KVTierConfig.load(env={CONFIG_FILE_ENV: path}).cpu.threads == 9
    other = tmp_path / "other.yaml"
    other.write_text("cpu: {threads: 5}\n")
    assert KVTierConfig.load(other, env={CONFIG_FILE_ENV: path}).cpu.threads == 5  # path wins


def test_overrides_accept_cache_config_names():
    cfg = KVTierConfig.load(env={}, method="cpu", staging_bytes="1MiB", tenant_salt=b"\x01")
    assert cfg.cpu.method == "cpu" and cfg.cpu.staging_bytes == 1 << 20
    assert cfg.model.tenant_salt == b"\x01"
    assert KVTierConfig.load(env={}, **cfg.cache_kwargs()) == cfg


def test_sections_as_dicts_or_objects():
    cfg = KVTierConfig(cpu={"bytes": "4GiB"}, peers={"listen": "h:1", "gossip_interval_ms": 50})
    assert cfg.cpu.bytes == 4 * GiB
    assert cfg.peers["gossip_interval_ms"] == 50  # peers passes unknown keys through
    assert KVTierConfig.load(env={}, cpu=CpuConfig(threads=6)).cpu.threads == 6


def test_replace():
    cfg = KVTierConfig.load(env={}, cpu_threads=3)
    new = cfg.replace(cpu_bytes="2GiB", model={"chunk_tokens": 512})
    assert (new.cpu.bytes, new.cpu.threads, new.model.chunk_tokens) == (2 * GiB, 3, 512)
    assert cfg.cpu.bytes == GiB  # the original is unchanged


# -- sizes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (4096, 4096),
        (0, 0),
        (8.0, 8),
        ("123", 123),
        ("8GiB", 8 << 30),
        ("8gib", 8 << 30),
        ("8 GiB", 8 << 30),
        ("512MB", 512_000_000),
        ("512mb", 512_000_000),
        ("1.5TB", 1_500_000_000_000),
        ("1.5TiB", 3 << 39),
        ("2kB", 2000),
        ("2KiB", 2048),
        ("3PB", 3 * 10**15),
        ("1PiB", 1 << 50),
        ("10B", 10),
        ("1_000", 1000),
        ("1.1KiB", 1126),  # a fraction of a byte is dropped
        (".5KiB", 512),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GiB", "8G", "8 gigabytes", "-1", "1e9", "8GiBs", "0x10", -5, 1.5, True, None, [1]]
)
def test_parse_size_rejects(bad):
    with pytest.raises(InvalidArgumentError) as e:
        parse_size(bad, key="cpu.bytes")
    msg = str(e.value)
    assert msg.startswith("cpu.bytes: invalid value " + repr(bad))
    assert "allowed: an integer number of bytes or a string like '8GiB'" in msg


# -- validation ----------------------------------------------------------------------------------
# One wrong value per key: (dotted key, value, a piece of the "allowed" text).
BAD_VALUES = [
    ("cpu.bytes", "8G", "a size of at least 1 byte: "),
    ("cpu.bytes", 0, "a size of at least 1 byte: "),
    ("cpu.method", "dma", "one of 'auto', 'direct', 'staged', 'zero_copy', 'cpu'"),
    ("cpu.staging_bytes", "-1MiB", "a size of at least 1 byte: "),
    ("cpu.threads", 0, "an integer in [1, 1024]"),
    ("cpu.threads", "two", "an integer in [1, 1024]"),
    ("cpu.prefault", "always", "true or false"),
    ("cpu.eviction_policy", "fifo", "one of 'lru', 's3fifo', 'lfu'"),
    ("cpu.verify_stores", "sometimes", "true or false"),
    ("disk.dir", "/does/not/exist", "an existing directory, or null (no disk tier)"),
    ("disk.bytes", "lots", "a size: an integer number"),
    ("disk.backend", "aio", "one of 'auto', 'io_uring', 'posix'"),
    ("disk.admit_min_seen", 0, "an integer >= 1"),
    ("disk.queue_depth", 0, "an integer in [1, 4096]"),
    ("disk.queue_depth", 5000, "an integer in [1, 4096]"),
    ("disk.io_timeout_s", 0, "a number >= 0.001"),
    ("disk.deterministic_writeback", "maybe", "true or false"),
    ("disk.write_through", "maybe", "true or false"),
    ("disk.max_writebacks_in_flight", 0, "an integer in [1, 1048576]"),
    ("disk.reset_on_mismatch", "wipe", "true or false"),
    ("disk.persist_on_close", "sometimes", "true or false"),
    ("disk.persist_interval_s", -1, "0 (off) or a number > 0"),
    ("gpu.pool_pages", -1, "an integer >= 1, or null"),
    ("gpu.bytes", "1 page", "a size of at least 1 byte: "),
    ("gpu.page_tokens", 0, "an integer >= 1"),
    ("model.model_id", "", "a non-empty string"),
    ("model.tenant_salt", 42, "a string or bytes, or null (no salt)"),
    ("model.chunk_tokens", 0, "an integer >= 1"),
    ("planner.enabled", "maybe", "true or false"),
    ("planner.gpu_prefill_tokens_per_s", -5, "a number > 0, or null (calibrate)"),
    ("planner.cpu_bandwidth_gbps", "fast", "a number > 0, or null (calibrate)"),
    ("planner.disk_bandwidth_gbps", 0, "a number > 0, or null (calibrate)"),
    ("planner.peer_bandwidth_gbps", "inf", "a number > 0, or null (calibrate)"),
    ("metrics.prometheus_port", 70000, "an integer in [0, 65535], or null"),
    ("metrics.prometheus_addr", "", "a non-empty string"),
    ("metrics.namespace", "kv-tier", "a Prometheus name"),
    ("events.capacity", -1, "an integer in [0, 1073741824]"),
    ("events.capacity", "many", "an integer in [0, 1073741824]"),
    ("codec.name", "lz4", "one of 'none', 'fp8', 'byteplane_zstd'"),
    ("codec.fp8_scale_dtype", "float16", "one of 'bfloat16', 'float32'"),
    ("codec.zstd_level", 23, "an integer in [-7, 22]"),
    ("codec.slot_fraction", 0, "a number > 0 and <= 1"),
    ("codec.device", "cuda", "one of 'host', 'gpu'"),
    ("peers.listen", "7400", "'host:port' with a port in [0, 65535]"),
    ("peers.seeds", "a:1,b", "a list of 'host:port'"),
    ("peers.secret_file", 5, "a file path"),
    ("peers.tls_cert_file", 5, "a file path"),
    ("peers.tls_key_file", [], "a file path"),
    ("peers.tls_ca_file", 1.5, "a file path"),
    ("timeout_s", 0, "a number > 0"),
    ("timeout_s", "soon", "a number > 0"),
]


def test_every_key_has_a_bad_value_case():
    assert {k for k, _, _ in BAD_VALUES} == set(config_keys())


def as_nested(dotted: str, value):
    section, _, key = dotted.partition(".")
    return {section: {key: value}} if key else {section: value}


def check_message(err: InvalidArgumentError, dotted: str, value, allowed: str, source: str):
    msg = str(err)
    assert msg.startswith(f"{dotted}: invalid value {value!r} (from {source}); allowed: "), msg
    assert allowed in msg, msg
    assert isinstance(err, ValueError)


@pytest.mark.parametrize(("dotted", "value", "allowed"), BAD_VALUES)
def test_bad_value_from_yaml_names_key_value_allowed_and_file(tmp_path, dotted, value, allowed):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(as_nested(dotted, value)))
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(path, env={})
    check_message(e.value, dotted, value, allowed, str(path))


# Every string is a valid file path and a valid salt: the environment cannot spell those wrong.
ENV_BAD_VALUES = [
    c
    for c in BAD_VALUES
    if c[0] not in ("peers.secret_file", "model.tenant_salt") and not c[0].startswith("peers.tls_")
]


@pytest.mark.parametrize(("dotted", "value", "allowed"), ENV_BAD_VALUES)
def test_bad_value_from_env_names_key_value_allowed_and_variable(dotted, value, allowed):
    var = config_keys()[dotted]["env"]
    text = str(value)
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(env={var: text})
    check_message(e.value, dotted, text, allowed, f"environment {var}")


@pytest.mark.parametrize(("dotted", "value", "allowed"), BAD_VALUES)
def test_bad_value_from_keyword(dotted, value, allowed):
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(env={}, **{dotted: value})
    check_message(e.value, dotted, value, allowed, f"keyword {dotted}")
    with pytest.raises(InvalidArgumentError, match=f"^{dotted}: invalid value"):
        KVTierConfig(**as_nested(dotted, value))  # direct construction checks the same


@pytest.mark.parametrize("value", [True, 1.5, [4], {"a": 1}])
def test_wrong_types_are_refused(value):
    with pytest.raises(InvalidArgumentError, match=r"^disk\.queue_depth: invalid value"):
        KVTierConfig.load(env={}, disk_queue_depth=value)


def test_keys_checked_together(tmp_path):
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(env={}, model_chunk_tokens=100)
    assert str(e.value).startswith("model.chunk_tokens: invalid value 100 (from keyword")
    assert "a multiple of gpu.page_tokens (16)" in str(e.value)
    assert KVTierConfig.load(env={}, model_chunk_tokens=96, gpu_page_tokens=32).model.chunk_tokens

    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(env={"KVTIER_GPU_POOL_PAGES": "10", "KVTIER_GPU_BYTES": "1GiB"})
    assert "gpu.bytes: invalid value 1073741824 (from environment KVTIER_GPU_BYTES)" in str(e.value)
    assert "null when gpu.pool_pages is set" in str(e.value)

    with pytest.raises(InvalidArgumentError, match=r"^disk\.bytes: invalid value 0; .*disk\.dir"):
        KVTierConfig.load(env={}, disk_dir=str(tmp_path))


# -- unknown keys --------------------------------------------------------------------------------
def test_unknown_yaml_key_suggests_close_match(tmp_path):
    path = write_yaml(tmp_path, "disk:\n  queue_dept: 8\n")
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(path, env={})
    assert str(e.value) == (f"unknown config key 'disk.queue_dept' (from {path}); did you mean 'disk.queue_depth'?")


def test_unknown_yaml_section_suggests_close_match(tmp_path):
    path = write_yaml(tmp_path, "planer:\n  enabled: false\n")
    with pytest.raises(InvalidArgumentError, match=r"unknown config section 'planer'.*'planner'"):
        KVTierConfig.load(path, env={})


def test_unknown_key_without_close_match_lists_the_known_ones(tmp_path):
    path = write_yaml(tmp_path, "cpu:\n  zzz: 1\n")
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(path, env={})
    assert "unknown config key 'cpu.zzz'" in str(e.value)
    assert "known: cpu.bytes, cpu.method, cpu.staging_bytes, cpu.threads" in str(e.value)


def test_unknown_env_var_suggests_close_match():
    with pytest.raises(InvalidArgumentError) as e:
        KVTierConfig.load(env={"KVTIER_DISK_QUEUEDEPTH": "8"})
    assert "unknown environment variable 'KVTIER_DISK_QUEUEDEPTH'" in str(e.value)
    assert "did you mean 'KVTIER_DISK_QUEUE_DEPTH'" in str(e.value)
    with pytest.raises(InvalidArgumentError, match="did you mean 'KVTIER_MODEL_ID'"):
        KVTierConfig.load(env={"KVTIER_MODEL_MODEL_ID": "x"})
    with pytest.raises(InvalidArgumentError, match="must be a config key"):
        KVTierConfig.load(env={"KVTIER_SOMETHING_ELSE": "1"})


def test_unknown_override_suggests_close_match():
    with pytest.raises(InvalidArgumentError, match=r"unknown config override 'cpu_byte'.*'cpu_bytes'"):
        KVTierConfig.load(env={}, cpu_byte=1)
    with pytest.raises(InvalidArgumentError, match=r"unknown config key 'cpu\.bytez'.*'cpu\.bytes'"):
        KVTierConfig.load(env={}, cpu={"bytez": 1})
    with pytest.raises(InvalidArgumentError, match=r"unknown config key 'cpu\.bytez'"):
        KVTierConfig(cpu={"bytez": 1})


def test_peers_pass_unknown_keys_through_yaml(tmp_path):
    path = write_yaml(tmp_path, "peers:\n  listen: h:1\n  relay: {kind: tcp, frames: 4}\n")
    cfg = KVTierConfig.load(path, env={})
    assert cfg.peers["relay"] == {"kind": "tcp", "frames": 4}
    assert isinstance(cfg.peers, PeersSection) and len(cfg.peers) == 7


# -- files ---------------------------------------------------------------------------------------
def test_bad_files(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        KVTierConfig.load(tmp_path / "missing.yaml", env={})
    with pytest.raises(InvalidArgumentError, match="is not valid YAML"):
        KVTierConfig.load(write_yaml(tmp_path, "cpu: [1, \n"), env={})
    with pytest.raises(InvalidArgumentError, match="must be a mapping of sections"):
        KVTierConfig.load(write_yaml(tmp_path, "- 1\n- 2\n"), env={})
    with pytest.raises(InvalidArgumentError, match=r"^cpu: invalid value '8GiB'.*a mapping of cpu"):
        KVTierConfig.load(write_yaml(tmp_path, "cpu: 8GiB\n"), env={})


def test_without_pyyaml_env_and_keywords_still_work(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, "cpu: {threads: 3}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # "import yaml" now raises ImportError
    assert KVTierConfig.load(env={"KVTIER_CPU_THREADS": "3"}, cpu_bytes="1MiB").cpu.threads == 3
    with pytest.raises(UnavailableError, match="PyYAML: pip install pyyaml"):
        KVTierConfig.load(path, env={})
    with pytest.raises(UnavailableError, match="PyYAML"):
        KVTierConfig().to_yaml()


# -- round trips ---------------------------------------------------------------------------------
def non_default_config(tmp_path) -> KVTierConfig:
    return KVTierConfig.load(
        env={},
        cpu={"bytes": "3GiB", "method": "zero_copy", "threads": 8, "eviction_policy": "lfu"},
        disk={"dir": str(tmp_path), "bytes": "10GB", "backend": "io_uring", "queue_depth": 128},
        gpu={"bytes": "40GiB", "page_tokens": 64},
        model={"model_id": "m", "tenant_salt": b"\x00\xffsalt", "chunk_tokens": 128},
        planner={"enabled": False, "cpu_bandwidth_gbps": 50.5, "gpu_prefill_tokens_per_s": 1e5},
        metrics={"prometheus_port": 9400, "prometheus_addr": "0.0.0.0", "namespace": "x"},
        peers={"listen": "h:1", "seeds": ["a:1", "b:2"], "secret_file": "/s", "extra": [1, 2]},
        timeout_s=1.25,
    )


def test_round_trip_to_yaml_and_load(tmp_path):
    cfg = non_default_config(tmp_path)
    path = tmp_path / "dumped.yaml"
    path.write_text(cfg.to_yaml())
    again = KVTierConfig.load(path, env={})
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()
    assert KVTierConfig.load(write_yaml(tmp_path, KVTierConfig().to_yaml()), env={}) == KVTierConfig()


def test_round_trip_to_dict_and_from_dict(tmp_path):
    cfg = non_default_config(tmp_path)
    d = cfg.to_dict()
    assert d["cpu"]["bytes"] == 3 * GiB and d["peers"]["seeds"] == ["a:1", "b:2"]
    assert KVTierConfig.from_dict(d) == cfg
    assert hash(KVTierConfig.from_dict(d)) == hash(cfg)


def test_pickle_and_deepcopy(tmp_path):
    cfg = non_default_config(tmp_path)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert copy.deepcopy(cfg) == cfg


def test_repr_hides_the_tenant_salt():
    cfg = KVTierConfig.load(env={}, model_tenant_salt="s3cret-tenant")
    assert "s3cret-tenant" not in repr(cfg)


# -- KVCache from the config ---------------------------------------------------------------------
def test_cache_kwargs_are_cache_config_fields():
    from kvtier.cache import CacheConfig

    assert set(KVTierConfig().cache_kwargs()) == {f.name for f in dataclasses.fields(CacheConfig)}


def tiny_layout():
    torch = pytest.importorskip("torch")
    from kvtier import Layout

    gen = torch.Generator().manual_seed(0)
    # vLLM layout: 2 layers of [K/V, 16 pages, 4 tokens, 2 heads, 8 dims]; 8-token chunks
    tensors = [torch.randn(2, 16, 4, 2, 8, generator=gen) for _ in range(2)]
    return Layout.from_vllm(tensors, chunk_tokens=8)


def roundtrip_through(cache, layout) -> None:
    tokens = list(range(100, 132))  # 4 chunks
    assert cache.store(tokens, list(range(8))).wait() == 4
    assert cache.lookup(tokens) == 32
    handle = cache.load(tokens, list(range(8, 16)))
    assert handle.wait() == 32
    for t in layout.tensors:
        assert bool((t[:, 8:16] == t[:, 0:8]).all())


def test_cache_kwargs_builds_a_kvcache():
    layout = tiny_layout()
    from kvtier import CacheConfig, KVCache

    cfg = KVTierConfig.load(env={}, cpu_bytes=8 * layout.chunk_bytes, cpu_method="cpu", model_id="tiny", timeout_s=5)
    with KVCache(layout, **cfg.cache_kwargs()) as cache:
        assert cache.config == CacheConfig(**cfg.cache_kwargs())
        assert cache.config.model_id == "tiny" and cache.config.cpu_bytes == 8 * layout.chunk_bytes
        roundtrip_through(cache, layout)


def test_cache_kwargs_builds_a_kvcache_with_a_disk_tier(tmp_path):
    layout = tiny_layout()
    from kvtier import KVCache

    disk_dir = os.environ.get("KVTIER_TEST_DISK_DIR") or str(tmp_path)
    cfg = KVTierConfig.load(
        env={},
        cpu={"bytes": 8 * layout.chunk_bytes, "method": "cpu"},
        disk={"dir": disk_dir, "bytes": "1MiB", "backend": "posix", "admit_min_seen": 1},
    )
    try:
        cache = KVCache(layout, **cfg.cache_kwargs())
    except (InvalidArgumentError, OSError) as e:
        pytest.skip(f"SKIPPED (needs an O_DIRECT file system; set KVTIER_TEST_DISK_DIR): {e}")
    with cache:
        roundtrip_through(cache, layout)
        assert cache.stats()["disk"]["backend"] == "posix"


# -- docs ----------------------------------------------------------------------------------------
def test_docs_list_every_key_and_variable():
    text = DOCS.read_text()
    for dotted, info in config_keys().items():
        assert f"`{dotted}`" in text, dotted
        assert f"`{info['env']}`" in text, info["env"]
    assert f"`{CONFIG_FILE_ENV}`" in text
