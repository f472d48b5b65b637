"""The vLLM connector's settings: ``kv_connector_extra_config`` validated into a kvtier config,
and the check that vLLM's deployment is one the connector supports."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from kvtier.config import KVTierConfig
from kvtier.config.addresses import parse_address
from kvtier.errors import InvalidArgumentError
from kvtier.layout import Shard

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The connector's settings, from ``kv_connector_extra_config`` (validated up front)."""

    config: KVTierConfig
    chunk_tokens: int
    layerwise: bool
    lookup_wait_s: float
    peers: dict | None
    load_async: bool = False

    def for_shard(self, shard: Shard | None, ports_per_rank: int = 1) -> _Settings:
        """The settings of the worker holding ``shard`` of a split model (tensor / pipeline
        parallel): its own disk directory (``<disk.dir>/<shard.label>``, made if missing: each
        rank keeps a disk tier of its own) and its own ports, each configured port plus the
        shard's rank times ``ports_per_rank`` (``peers.listen`` and every ``peers.seeds`` entry,
        so rank r of one instance peers with rank r of the others; ``metrics.prometheus_port``).
        Port 0 (any free port) stays 0. ``ports_per_rank``: a hybrid model's worker takes one
        peer port per KV cache group (:meth:`for_group`)."""
        if shard is None or shard.world_size == 1:
            return self
        r, where = shard.rank * ports_per_rank, "kv_connector_extra_config"
        over: dict = {}
        if self.config.disk.dir is not None:
            path = os.path.join(str(self.config.disk.dir), shard.label)
            os.makedirs(path, exist_ok=True)  # the config takes an existing directory
            over["disk.dir"] = path
        port = self.config.metrics.prometheus_port
        if port:
            over["metrics.prometheus_port"] = _offset_port(port, r, f"{where}.metrics.prometheus_port")
        config = self.config.replace(**over) if over else self.config
        return dataclasses.replace(self, config=config, peers=self._peers_plus(r))

    def for_group(self, group: int) -> dict | None:
        """The peer settings of a hybrid model's KV cache group ``group``: every peer port plus
        ``group`` (group g of one instance peers with group g of the others)."""
        return self._peers_plus(group)

    def _peers_plus(self, offset: int) -> dict | None:
        peers, where = self.peers, "kv_connector_extra_config"
        if peers is None or offset == 0:
            return peers
        peers = dict(peers)
        peers["listen"] = _offset_address(peers["listen"], offset, f"{where}.peers.listen")
        if peers.get("seeds"):
            peers["seeds"] = [_offset_address(a, offset, f"{where}.peers.seeds") for a in peers["seeds"]]
        return peers

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> _Settings:
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        where = "kv_connector_extra_config"
        block_size = int(vllm_config.cache_config.block_size)
        config_file = extra.pop("config_file", None)
        if config_file is not None and not (isinstance(config_file, str) and os.path.isfile(config_file)):
            raise InvalidArgumentError(f"{where}.config_file={config_file!r} is not a file")
        chunk_tokens = extra.pop("chunk_tokens", block_size)
        if (
            isinstance(chunk_tokens, bool)
            or not isinstance(chunk_tokens, int)
            or chunk_tokens <= 0
            or chunk_tokens % block_size
        ):
            raise InvalidArgumentError(
                f"{where}.chunk_tokens must be a positive multiple of vLLM's block_size "
                f"({block_size}), got {chunk_tokens!r}"
            )
        layerwise = extra.pop("layerwise", True)
        if not isinstance(layerwise, bool):
            raise InvalidArgumentError(f"{where}.layerwise must be true or false, got {layerwise!r}")
        load_async = extra.pop("load_async", False)
        if not isinstance(load_async, bool):
            raise InvalidArgumentError(f"{where}.load_async must be true or false, got {load_async!r}")
        lookup_wait_s = extra.pop("lookup_wait_s", 0.002)
        if (
            isinstance(lookup_wait_s, bool)
            or not isinstance(lookup_wait_s, (int, float))
            or not 0 <= lookup_wait_s <= 10
        ):
            raise InvalidArgumentError(
                f"{where}.lookup_wait_s must be a number of seconds in [0, 10], got {lookup_wait_s!r}"
            )
        secret = extra.pop("cluster_secret", None)
        peers = extra.pop("peers", None)
        if peers is not None and not isinstance(peers, dict):
            raise InvalidArgumentError(
                f"{where}.peers must be a mapping of peer settings (listen, seeds, secret, "
                f"secret_file, ...), got {type(peers).__name__}"
            )
        peers = dict(peers or {})
        if secret is not None:
            if "secret" in peers or "secret_file" in peers:
                raise InvalidArgumentError(
                    f"{where}: give cluster_secret or peers.secret / peers.secret_file, not both"
                )
            peers["secret"] = secret
        if peers:
            extra["peers"] = peers
        try:
            config = KVTierConfig.load(config_file, **extra)
        except InvalidArgumentError as e:
            raise InvalidArgumentError(f"{where}: {e}") from None
        peers_cfg = dict(config.peers)
        if peers_cfg.get("listen") is None:
            if any(v for k, v in peers_cfg.items() if k != "listen"):
                raise InvalidArgumentError(f"{where}.peers.listen is required when peers are configured")
            peers_cfg = None
        else:  # PeerConfig checks the rest (secret, timeouts) and names the field
            from kvtier.p2p.config import PeerConfig

            peers_cfg = {k: v for k, v in peers_cfg.items() if v is not None}
            try:
                PeerConfig(**peers_cfg)
            except TypeError as e:
                raise InvalidArgumentError(f"{where}.peers: {e}") from None
            except InvalidArgumentError as e:
                raise InvalidArgumentError(f"{where}: {e}") from None
        if config.cpu.prefault is None:  # a serving process: first stores should not pay page faults
            config = config.replace(cpu_prefault=True)
        if config.model.model_id == "default":  # not set: the served model names the keys
            model = vllm_config.model_config
            config = config.replace(model_id=f"vllm:{model.model}@{model.revision or 'main'}")
        return cls(
            config=config,
            chunk_tokens=chunk_tokens,
            layerwise=layerwise,
            lookup_wait_s=float(lookup_wait_s),
            peers=peers_cfg,
            load_async=load_async,
        )


def _offset_port(port: int, rank: int, what: str) -> int:
    if port + rank > 65535:
        raise InvalidArgumentError(f"{what}: port {port} + rank {rank} is past 65535")
    return port + rank


def _offset_address(addr: str, rank: int, what: str) -> str:
    host, port = parse_address(addr, what)
    if port == 0:
        return addr
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{_offset_port(port, rank, what)}"


def _check_hybrid(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Refuse, at start, KV cache groups the hybrid connector would not store and load whole:
    groups other than full attention (MLA included) and sliding window (Mamba and other
    recurrent state, chunked-local attention), or groups whose block size is not vLLM's."""
    if kv_cache_config is None:
        return
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec

    block_size = int(vllm_config.cache_config.block_size)
    for i, group in enumerate(kv_cache_config.kv_cache_groups):
        spec = group.kv_cache_spec
        if type(spec) not in (FullAttentionSpec, MLAAttentionSpec, SlidingWindowSpec):
            raise InvalidArgumentError(
                f"KVTierHybridConnector stores full-attention and sliding-window KV cache groups; "
                f"group {i} is {_spec_names(spec)} (recurrent state is not per-token KV, and "
                "chunked-local groups are not built): refused at start rather than serving "
                "partial state"
            )
        if int(spec.block_size) != block_size:
            raise InvalidArgumentError(
                f"KVTierHybridConnector: KV cache group {i} has block_size {spec.block_size}, "
                f"vLLM's block_size is {block_size}; kvtier needs one block size for every group"
            )


def _check_supported(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> None:
    """Refuse, at start, a model whose KV kvtier would not store and load whole: more than one
    KV cache group (vLLM's hybrid allocator: sliding-window, Mamba or chunked-local groups beside
    full attention), or a group whose layers are not full attention. A sliding-window group's
    blocks outside the window are vLLM's shared null block, so its chunks are not whole; a
    Mamba group holds recurrent state, not per-token KV. Full attention that vLLM records with a
    sliding window (``FullAttentionSpec.sliding_window``: the hybrid allocator off, blocks
    allocated for every token, the window applied in the kernel) is whole, and supported."""
    if kv_cache_config is None:
        return
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        kinds = ", ".join(_spec_names(g.kv_cache_spec) for g in groups)
        raise InvalidArgumentError(
            "KVTierConnector supports models with one full-attention KV cache group; this model "
            f"has {len(groups)} ({kinds}: a hybrid model under vLLM's hybrid KV cache allocator). "
            "kv_connector='KVTierHybridConnector' stores full-attention and sliding-window "
            "groups; --disable-hybrid-kv-cache-manager gives such a model one full-attention group"
        )
    refused = _spec_names(groups[0].kv_cache_spec, only_refused=True)
    if refused:
        raise InvalidArgumentError(
            f"KVTierConnector stores full-attention KV only; this model's layers use {refused} "
            "(blocks outside a sliding window are vLLM's shared null block, recurrent state is "
            "not per-token KV): a prefix kvtier loaded would not be whole. Refused at start "
            "rather than serving partial state"
        )


def _spec_names(spec, only_refused: bool = False) -> str:
    """The KV cache spec classes of ``spec`` (UniformTypeKVCacheSpecs: each layer's), with a
    sliding window where one is set; ``only_refused``: those kvtier cannot store."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec

    inner = getattr(spec, "kv_cache_specs", None)
    specs = list(inner.values()) if isinstance(inner, dict) else [spec]
    names = []
    for sp in specs:
        if only_refused and type(sp) in (FullAttentionSpec, MLAAttentionSpec):
            continue
        window = getattr(sp, "sliding_window", None)
        name = type(sp).__name__ + (f"(sliding_window={window})" if window else "")
        if name not in names:
            names.append(name)
    return ", ".join(names)
