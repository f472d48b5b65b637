"""Each setting is declared once: one size parser behind every entry point (config file,
environment, keyword overrides, CacheConfig, `kvtier peer`), CacheConfig's fields and checks
taken from the config keys, PeerConfig's and the `peers:` section's checks the same, and
docs/configuration.md listing exactly the keys."""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import tempfile
from decimal import Decimal

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kvtier.config import (
    CACHE_FIELDS,
    ENV_VARS,
    CacheConfig,
    KVTierConfig,
    PeersSection,
    config_keys,
    parse_size,
)
from kvtier.errors import InvalidArgumentError

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
SECRET = b"s" * 32

# Every unit parse_size knows, and its factor: the documented convention.
UNITS = {
    "": 1,
    "B": 1,
    "kB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "PB": 10**15,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
    "PiB": 2**50,
}


# -- the entry points of a size ------------------------------------------------------------------
def peer_parser() -> argparse.ArgumentParser:
    from kvtier.p2p import cli as peer_cli

    ap = argparse.ArgumentParser(prog="kvtier")
    peer_cli.add_parser(ap.add_subparsers())
    return ap


PEER = peer_parser()


def via_peer_cli(text: str) -> int:
    args = PEER.parse_args(["peer", "--layout", "{}", "--secret-file", "s", "--cpu-bytes", text])
    return args.cpu_bytes


def via_yaml(text: str) -> int:
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kvtier.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"cpu": {"bytes": text}}, f)  # a string, as a user quotes it
        return KVTierConfig.load(path, env={}).cpu.bytes


def via_env(text: str) -> int:
    return KVTierConfig.load(env={"KVTIER_CPU_BYTES": text}).cpu.bytes


def via_keyword(text: str) -> int:
    return KVTierConfig.load(env={}, cpu_bytes=text).cpu.bytes


def via_cache_config(text: str) -> int:
    return KVTierConfig.load(env={"KVTIER_CPU_BYTES": text}).cache_config().cpu_bytes


ENTRY_POINTS = (parse_size, via_yaml, via_env, via_keyword, via_cache_config, via_peer_cli)


def case_forms(unit: str):
    return st.sampled_from(sorted({unit, unit.lower(), unit.upper(), unit.swapcase()}))


@st.composite
def size_texts(draw):
    """(text, bytes): a number and a unit in any case, with or without spaces."""
    unit = draw(st.sampled_from(sorted(UNITS)))
    spelled = draw(case_forms(unit))
    whole = draw(st.integers(0, 10**6))
    frac = draw(st.one_of(st.just(""), st.from_regex(r"\.[0-9]{1,3}", fullmatch=True)))
    gap = draw(st.sampled_from(["", " "])) if unit else ""
    number = f"{whole}{frac}"
    return f"{number}{gap}{spelled}", int(Decimal(number) * UNITS[unit])


@given(size_texts())
@settings(max_examples=300, deadline=None)
def test_parse_size_reads_every_unit_form(case):
    text, expected = case
    assert parse_size(text) == expected
    assert parse_size(f"  {text}  ") == expected


@given(st.integers(1, 1 << 20), st.sampled_from(sorted(UNITS)))
@settings(max_examples=200, deadline=None)
def test_sizes_round_trip_through_every_unit(n, unit):
    """n units written in any form read back as n * the unit's factor; the bytes written to a
    config file by to_yaml() read back as the same bytes."""
    for spelled in {unit, unit.lower(), unit.upper()}:
        assert parse_size(f"{n}{spelled}") == n * UNITS[unit]
    cfg = KVTierConfig.load(env={}, cpu_bytes=f"{n}{unit}")
    assert KVTierConfig.from_dict(cfg.to_dict()).cpu.bytes == n * UNITS[unit]


@given(size_texts())
@settings(max_examples=60, deadline=None)
def test_every_entry_point_reads_a_size_the_same(case):
    text, expected = case
    assume(expected >= 1)  # cpu.bytes takes at least one byte
    assert [read(text) for read in ENTRY_POINTS] == [expected] * len(ENTRY_POINTS)


@pytest.mark.parametrize("text", ["8G", "8g", "1.5T", "512M", "4K", "2P", "8 G", "8Gi"])
def test_every_entry_point_refuses_a_bare_unit(text, capsys):
    for read in ENTRY_POINTS[:-1]:
        with pytest.raises(InvalidArgumentError, match="refused as ambiguous"):
            read(text)
    with pytest.raises(SystemExit):
        via_peer_cli(text)
    err = capsys.readouterr().err
    assert f"argument --cpu-bytes: invalid value {text!r}" in err and "ambiguous" in err


def test_peer_cli_defaults_and_help_say_the_convention():
    args = PEER.parse_args(["peer", "--layout", "{}", "--secret-file", "s"])
    assert (args.cpu_bytes, args.disk_bytes) == (1 << 30, 16 << 30)
    assert via_peer_cli("8GiB") == 8 << 30 and via_peer_cli("8GB") == 8 * 10**9
    sub = next(a for a in PEER._actions if isinstance(a, argparse._SubParsersAction))
    text = " ".join(sub.choices["peer"].format_help().split())
    assert "8GiB = 8*2^30" in text and "8GB = 8*10^9" in text and "bare 8G is refused" in text


def test_docs_say_the_size_convention():
    text = " ".join(DOCS.read_text().split())
    assert "`kB MB GB TB PB` are powers of 1000; `KiB MiB GiB TiB PiB` are powers of 1024" in text
    assert "A bare `G` or `M` is refused" in text and "`kvtier peer --cpu-bytes`" in text


# -- CacheConfig: the config's cache keys --------------------------------------------------------
def schema_field(dotted: str) -> dataclasses.Field | None:
    section, _, key = dotted.partition(".")
    if not key:
        return None
    cls = type(getattr(KVTierConfig(), section))
    return next(f for f in dataclasses.fields(cls) if f.name == key)


def test_cache_config_fields_are_the_cache_keys():
    keys = config_keys()
    assert [f.name for f in dataclasses.fields(CacheConfig)] == list(CACHE_FIELDS)
    assert set(KVTierConfig().cache_kwargs()) == set(CACHE_FIELDS)
    for f in dataclasses.fields(CacheConfig):
        dotted = CACHE_FIELDS[f.name]
        assert f.metadata["key"] == dotted and dotted in keys
        src = schema_field(dotted)
        if src is not None:  # the very checker of the config key, not a copy of its rule
            assert f.metadata["check"] is src.metadata["check"], f.name
            assert f.metadata["doc"].startswith(src.metadata["doc"]), f.name
        if f.name == "verify_stores":
            assert f.default is None  # None: the key's variable
        else:
            assert f.default == keys[dotted]["default"], f.name


def test_cache_names_that_are_also_variable_names_mean_the_same_key():
    for var, dotted in ENV_VARS.items():
        flat = var.removeprefix("KVTIER_").lower()
        if flat in CACHE_FIELDS:
            assert CACHE_FIELDS[flat] == dotted
    for name, dotted in CACHE_FIELDS.items():  # every CacheConfig name is a loader keyword
        value = KVTierConfig().cache_kwargs()[name]
        assert KVTierConfig.load(env={}, **{name: value}).cache_kwargs()[name] == value, dotted


# (CacheConfig field, a value both CacheConfig and the loader refuse, a value both take)
CACHE_CASES = [
    ("cpu_bytes", 0, 4096),
    ("model_id", "", "m"),
    ("tenant_salt", 42, b"salt"),
    ("method", "dma", "cpu"),
    ("staging_bytes", -1, 1 << 20),
    ("cpu_threads", 2000, 8),
    ("cpu_prefault", "always", False),
    ("timeout_s", 0, 2.5),
    ("disk_dir", "/does/not/exist", None),
    ("disk_bytes", -5, 1 << 30),
    ("disk_backend", "aio", "posix"),
    ("disk_admit_min_seen", 0, 3),
    ("disk_queue_depth", 5000, 64),
    ("disk_io_timeout_s", float("inf"), 0.5),
    ("eviction_policy", "fifo", "s3fifo"),
    ("deterministic_writeback", "maybe", True),
    ("disk_write_through", "maybe", True),
    ("disk_max_writebacks_in_flight", 0, 8),
    ("verify_stores", "sometimes", True),
    ("disk_reset_on_mismatch", "wipe", True),
    ("disk_persist_on_close", "sometimes", False),
    ("disk_persist_interval_s", 2e9, 0),
    ("events_capacity", -1, 0),
    ("codec_name", "gzip", "fp8"),
    ("codec_fp8_scale_dtype", "float8", "float32"),
    ("codec_zstd_level", -8, 3),
    ("codec_slot_fraction", 1.5, 0.75),
    ("codec_device", "tpu", "gpu"),
]


def test_every_cache_field_has_a_case():
    assert [c[0] for c in CACHE_CASES] == list(CACHE_FIELDS)


@pytest.mark.parametrize(("name", "bad", "good"), CACHE_CASES)
def test_cache_config_and_the_loader_apply_one_rule(name, bad, good):
    dotted = CACHE_FIELDS[name]
    with pytest.raises(InvalidArgumentError) as e:
        CacheConfig(**{name: bad})
    assert str(e.value).startswith(f"{name}: invalid value {bad!r}; allowed: ")
    with pytest.raises(InvalidArgumentError) as e2:
        KVTierConfig.load(env={}, **{dotted: bad})
    assert str(e2.value).startswith(f"{dotted}: invalid value {bad!r} (from keyword {dotted})")
    assert getattr(CacheConfig(**{name: good}), name) == KVTierConfig.load(env={}, **{dotted: good}).get(dotted)


def test_cache_config_takes_python_values_only():
    """Text forms are for config files and the environment; a Python caller passes the type."""
    for name, text in [
        ("cpu_bytes", "8GiB"),
        ("cpu_threads", "4"),
        ("deterministic_writeback", "yes"),
        ("deterministic_writeback", 1),
        ("disk_persist_on_close", "false"),
    ]:
        with pytest.raises(InvalidArgumentError, match=rf"^{name}: invalid value {re.escape(repr(text))}"):
            CacheConfig(**{name: text})
    with pytest.raises(InvalidArgumentError, match=r"allowed: an int number of bytes >= 1"):
        CacheConfig(cpu_bytes="8GiB")
    with pytest.raises(InvalidArgumentError, match=r"allowed: True or False"):
        CacheConfig(disk_persist_on_close="false")
    assert KVTierConfig.load(env={}, cpu_bytes="8GiB").cache_config().cpu_bytes == 8 << 30


def test_rules_over_several_keys_name_the_key_as_the_caller_wrote_it(tmp_path):
    with pytest.raises(InvalidArgumentError) as e:
        CacheConfig(disk_dir=str(tmp_path), disk_bytes=0)
    assert str(e.value) == "disk_bytes: invalid value 0; allowed: a size >= 1 byte when disk_dir is set"
    with pytest.raises(InvalidArgumentError, match=r"^disk\.bytes: .* when disk\.dir is set$"):
        KVTierConfig(disk={"dir": str(tmp_path)})


def test_verify_stores_none_reads_its_variable(monkeypatch):
    monkeypatch.delenv("KVTIER_CPU_VERIFY_STORES", raising=False)
    assert CacheConfig().verify_stores is False
    for text, value in [("", False), ("on", True), (" 0 ", False), ("TRUE", True)]:
        monkeypatch.setenv("KVTIER_CPU_VERIFY_STORES", text)
        assert CacheConfig().verify_stores is value
        assert CacheConfig(verify_stores=False).verify_stores is False
    monkeypatch.setenv("KVTIER_CPU_VERIFY_STORES", "maybe")
    with pytest.raises(InvalidArgumentError) as e:
        CacheConfig()
    assert str(e.value).startswith(
        "cpu.verify_stores: invalid value 'maybe' (from environment KVTIER_CPU_VERIFY_STORES)"
    )


def test_kvtier_config_builds_its_cache_config():
    cfg = KVTierConfig.load(env={}, cpu_bytes="2GiB", disk_queue_depth="8", method="cpu")
    assert cfg.cache_config() == CacheConfig(**cfg.cache_kwargs())
    assert (cfg.cache_config().cpu_bytes, cfg.cache_config().disk_queue_depth) == (2 << 30, 8)


# -- peers: the section of a config file and a peer service's settings ---------------------------
def peer_fields():
    from kvtier.p2p import PeerConfig

    return {f.name: f for f in dataclasses.fields(PeerConfig)}


def test_peers_section_checks_its_keys_with_peer_config_checkers():
    fields = peer_fields()
    for key, (_, check, doc) in PeersSection.KNOWN.items():
        own = fields[key].metadata["check"]
        assert check is own or check.inner is own, key  # listen: also null (no peer service)
        assert doc == fields[key].metadata["doc"]


PEER_BAD = [
    ("listen", "nowhere"),
    ("seeds", "a:1,b"),
    ("advertise", "10.0.0.1"),
    ("node_id", "x" * 65),
    ("request_timeout_s", 0),
    ("gossip_interval_s", -1.0),
    ("indirect_probes", 0),
    ("digest_fp_rate", 0.5),
    ("max_request_chunks", 5000),
    ("share_pool", "nfs"),
    ("tls_cert_file", 5),
]


@pytest.mark.parametrize(("key", "bad"), PEER_BAD)
def test_peer_config_and_the_peers_section_refuse_alike(key, bad):
    from kvtier.p2p import PeerConfig

    with pytest.raises(InvalidArgumentError) as e:
        PeerConfig(secret=SECRET, **{key: bad})
    assert str(e.value).startswith(f"peers.{key}: invalid value {bad!r}; allowed: ")
    with pytest.raises(InvalidArgumentError) as e2:
        KVTierConfig.load(env={}, peers={key: bad})
    assert str(e2.value).startswith(f"peers.{key}: invalid value {bad!r} (from keyword peers)")
    # the same checker: the section's text is PeerConfig's, where the section also takes null
    runtime, section = str(e.value).split("allowed: ")[1], str(e2.value).split("allowed: ")[1]
    assert section.startswith(runtime.split(", or None (")[0])


def test_peers_section_values_build_a_peer_config(tmp_path):
    from kvtier.p2p import PeerConfig

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    cfg = KVTierConfig.load(
        env={"KVTIER_PEERS_SEEDS": "a:1, b:2"},
        peers={"listen": "0.0.0.0:7400", "secret_file": str(secret), "gossip_interval_s": "0.5"},
    )
    assert cfg.peers["gossip_interval_s"] == 0.5  # a PeerConfig key: checked and read as a number
    peer = PeerConfig(**{k: v for k, v in cfg.peers.items() if v is not None})
    assert (peer.listen, peer.seeds, peer.gossip_interval_s) == (
        "0.0.0.0:7400",
        ("a:1", "b:2"),
        0.5,
    )


def test_peers_section_hides_a_secret_as_peer_config_does():
    cfg = KVTierConfig(peers={"listen": "h:1", "secret": "hunter2-hunter2-hunter2"})
    assert "hunter2" not in repr(cfg.peers) and "hunter2" not in repr(cfg)


def test_peers_config_is_a_deprecated_name_of_peers_section():
    import kvtier.config

    with pytest.warns(DeprecationWarning, match="renamed PeersSection"):
        assert kvtier.config.PeersConfig is PeersSection


# -- docs ----------------------------------------------------------------------------------------
def doc_table_names(heading: str) -> list[str]:
    """The first cells (backticked names) of the tables under one `## heading` of the docs."""
    text = DOCS.read_text()
    part = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", part, flags=re.MULTILINE)


def test_docs_tables_list_exactly_the_config_keys():
    names = doc_table_names("Keys")
    assert len(names) == len(set(names))
    assert set(names) == set(config_keys())


def test_docs_list_exactly_the_cache_config_fields_and_their_keys():
    text = DOCS.read_text()
    names = doc_table_names("KVCache keywords")
    assert names == list(CACHE_FIELDS)
    for name, dotted in CACHE_FIELDS.items():
        assert f"| `{name}` | `{dotted}` |" in text
