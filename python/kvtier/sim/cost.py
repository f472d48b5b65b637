"""The simulator's cost model: how long a request's prefill, loads and offloads take.

Prefill of tokens ``[start, end)`` of a dense decoder (kvtier.planner.ModelCost's FLOP count,
with its two parts at their own rates)::

    t = 2 * params * (end - start) / weights_rate
        + 4 * layers * hidden * sum(p for p in [start, end)) / attention_rate

Weight FLOPs run as GEMMs whose achieved rate depends on the engine; attention FLOPs run in a
fused (flash) kernel near the GPU's matmul peak. Calibrated, never guessed: ``weights_rate`` from
one measured full-recompute TTFT (bench_e2e, one prompt length), ``attention_rate`` from the
measured bf16 matmul of bench_copy_py; tier bandwidths from bench_copy / bench_copy_py (PCIe,
through the Python API), bench_disk (the device's sequential O_DIRECT limits), bench_p2p (peer
pulls: a NIXL pull's case where a bench recorded one, else the TCP pull's; ``LINK_BW_CASES``).
:meth:`Calibration.hardware` reads them and records where each number came from.

Moving chunks:
- CPU -> GPU (a CPU hit): ``bytes / h2d_bw``; GPU -> CPU (offload of GPU victims, which the
  pool waits for): ``bytes / d2h_bw``.
- disk -> GPU (a disk hit): the read ``bytes / disk_read_bw``, then the scatter as a CPU hit;
  when the CPU tier is full of chunks that must be written back first, each block the promotion
  needs waits for one write-back: ``+ chunk_bytes / disk_write_bw`` each (the disk does one thing
  at a time).
- peer -> GPU: ``link_latency + bytes / link_bw`` then the scatter, per path: a pull from a peer
  on another host crosses ``link_bw`` / ``link_latency_s``, one from a peer on the same host
  ``local_link_bw`` / ``local_link_latency_s`` (the cross-host link's when not set); a request
  that pulls over both pays both, in series (:meth:`HardwareCost.peer_pull_s`).
- A codec below the GPU (``HardwareCost.codec``, a kvtier.planner.CodecCost calibrated from
  bench_codec_fidelity by :meth:`Calibration.codec`): CPU blocks and disk slots hold its stored
  bytes (``chunk_bytes / ratio``: more chunks per byte), disk reads, write-backs and peer pulls
  move them, every lower-tier chunk loaded pays its decode and every offloaded chunk its encode;
  the scatter moves the stored bytes when it decodes on the GPU, the whole chunk otherwise.
- With ``load_compute_overlap`` (bench_e2e records it for an engine that does this) the scatter overlaps the step that
  reads the chunks, layer by layer; disk reads and write-backs still precede it
  (kvtier.sim.engine.request_service_s).
"""

from __future__ import annotations

import fnmatch
import glob
import itertools
import json
import math
import os
from dataclasses import dataclass, field, replace

from kvtier.planner import CodecCost

__all__ = [
    "LINK_BW_CASES",
    "LINK_LATENCY_CASES",
    "MODEL_PRESETS",
    "CalibratedPlanner",
    "Calibration",
    "HardwareCost",
    "ModelShape",
    "one_step_prefill",
]

# The bench cases the peers' cross-host link is calibrated from, first found wins: a NIXL pull
# (the data path of issue "Peers move KV over NIXL"; a case named p2p_pull_nixl, or p2p_pull_nixl_<x>
# such as p2p_pull_nixl_ucx_rdma, in GB/s), then the TCP pull with crc32c checksums that bench_p2p
# records today. Looked up in every bench_p2p*-*.json of the directory, newest ``date`` first.
LINK_BW_CASES = ("p2p_pull_nixl", "p2p_pull_nixl_*", "p2p_pull_crc32c")
# The link's latency, where a bench measured it (a case in us, ms or s; none does yet: the
# default 200 us stays until one does).
LINK_LATENCY_CASES = ("p2p_pull_nixl_latency", "p2p_pull_latency")


@dataclass(frozen=True)
class ModelShape:
    """A dense decoder's shape: what its KV weighs and what its prefill costs."""

    name: str
    params: float
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def weight_flops(self, start: int, end: int) -> float:
        """GEMM FLOPs of tokens [start, end)."""
        return 2.0 * self.params * (end - start)

    def attention_flops(self, start: int, end: int) -> float:
        """Attention FLOPs of tokens [start, end) over every token before each."""
        return 4.0 * self.layers * self.hidden * (end * (end - 1) - start * (start - 1)) / 2.0


MODEL_PRESETS = {
    "llama3_8b": ModelShape("llama3_8b", 8.0e9, 32, 4096, 8, 128),
    "llama3_70b": ModelShape("llama3_70b", 70.6e9, 80, 8192, 8, 128),
    "qwen2_7b": ModelShape("qwen2_7b", 7.6e9, 28, 3584, 4, 128),
}


@dataclass
class HardwareCost:
    """Rates of one simulated instance (bytes/s, FLOP/s, seconds).

    ``hit_forward_s``: the fixed cost of a forward step over a cached prefix (a hit's step, the
    rest of a split plan): the host-bound launch of every layer's kernels and the gathers of the
    cached K/V pages, which a short step's GPU work does not hide (0: not modelled, as for the
    chunked-prefill engine whose recompute ran as many such steps). ``writebacks_share_disk``:
    a load's disk reads share the disk with every write-back the load started (a promotion into a
    full CPU tier evicts a chunk to write back for each one it reads), not only those it waited
    for. ``load_compute_overlap``: a step's layer ``l`` computes as soon as layer ``l`` of the
    pages loaded from a lower tier has landed (bench_e2e records ``load_compute_overlap`` in its
    JSON for such an engine), so a load's copy overlaps the step instead of preceding
    it (kvtier.sim.engine.request_service_s gives both forms). ``attention_after_prefix``:
    ``(new tokens, FLOP/s)`` points, the attention rate of a step after a cached prefix by its
    size (:meth:`attention_rate_of`). ``hit_step_overlaps``: a step after a cached prefix costs
    the longer of ``hit_forward_s`` (its host-bound launches) and its weights' GEMMs, which the
    GPU runs while the host launches, plus its attention, instead of launches + all its FLOPs
    (kvtier.sim.engine.prefill_step_s); set with measured attention rates. ``link_bw``,
    ``link_latency_s``: a peer pull between hosts; ``local_link_bw``, ``local_link_latency_s``: a
    pull from a peer on the same host (None: the cross-host link's; no bench measures that path
    into the CPU tier yet). ``sources`` says where each calibrated number came from (file and
    case)."""

    weights_rate: float = 100e12
    attention_rate: float = 600e12
    h2d_bw: float = 50e9
    d2h_bw: float = 50e9
    disk_read_bw: float = 1.2e9
    disk_write_bw: float = 1.7e9
    disk_latency_s: float = 100e-6
    link_bw: float = 4e9
    link_latency_s: float = 200e-6
    local_link_bw: float | None = None
    local_link_latency_s: float | None = None
    hit_forward_s: float = 0.0
    writebacks_share_disk: bool = False
    load_compute_overlap: bool = False
    attention_after_prefix: tuple = ()
    hit_step_overlaps: bool = False
    codec: CodecCost = field(default_factory=CodecCost)
    sources: dict = field(default_factory=dict)

    def values(self) -> dict:
        """The cost model's numbers in round units (TFLOP/s, GB/s, ms), for a report beside
        ``sources``: what each calibrated number came to, not only where it came from."""
        v = {
            "weights_tflops": round(self.weights_rate / 1e12, 1),
            "attention_tflops": round(self.attention_rate / 1e12, 1),
            "h2d_gbps": round(self.h2d_bw / 1e9, 2),
            "d2h_gbps": round(self.d2h_bw / 1e9, 2),
            "disk_read_gbps": round(self.disk_read_bw / 1e9, 3),
            "disk_write_gbps": round(self.disk_write_bw / 1e9, 3),
            "link_gbps": round(self.link_bw / 1e9, 2),
            "hit_forward_ms": round(self.hit_forward_s * 1e3, 2),
            "load_compute_overlap": self.load_compute_overlap,
            "hit_step_overlaps": self.hit_step_overlaps,
        }
        if self.local_link_bw is not None or self.local_link_latency_s is not None:
            v["local_link_gbps"] = round(self.same_host_link()[0] / 1e9, 2)
        if self.codec.name != "none":
            c = self.codec
            v["codec"] = {
                "name": c.name,
                "ratio": round(c.ratio, 3),
                "decode_gbps": None if c.decode_bytes_per_s is None else round(c.decode_bytes_per_s / 1e9, 3),
                "encode_gbps": None if c.encode_bytes_per_s is None else round(c.encode_bytes_per_s / 1e9, 3),
                "decode_on_gpu": c.decode_on_gpu,
            }
        if self.attention_after_prefix:
            v["attention_after_prefix_tflops"] = {t: round(r / 1e12, 1) for t, r in self.attention_after_prefix}
        return v

    def same_host_link(self) -> tuple[float, float]:
        """(bytes/s, seconds of latency) of a pull from a peer on the same host."""
        bw = self.link_bw if self.local_link_bw is None else self.local_link_bw
        lat = self.link_latency_s if self.local_link_latency_s is None else self.local_link_latency_s
        return bw, lat

    def peer_pull_s(self, chunk_bytes: int, cross_host: int, same_host: int = 0) -> float:
        """Seconds to pull ``cross_host`` chunks from peers on other hosts and ``same_host`` from
        peers on this one into the CPU tier (before their scatter): each path used costs its
        latency once and its bytes at its bandwidth; the two paths in series."""
        t = cross_host * chunk_bytes / self.link_bw + self.link_latency_s if cross_host else 0.0
        if same_host:
            bw, lat = self.same_host_link()
            t += same_host * chunk_bytes / bw + lat
        return t

    def stored_bytes(self, chunk_bytes: int) -> int:
        """Bytes a chunk takes below the GPU (a CPU block's or disk slot's payload)."""
        return self.codec.stored_bytes(chunk_bytes)

    def scatter_bytes(self, chunk_bytes: int) -> float:
        """Bytes the CPU -> GPU copy of one chunk moves."""
        return self.codec.moved_bytes("cpu", chunk_bytes)

    def prefill_s(self, model: ModelShape, start: int, end: int) -> float:
        """Seconds to prefill tokens [start, end) with the KV of [0, start) in place."""
        if end <= start:
            return 0.0
        return model.weight_flops(start, end) / self.weights_rate + model.attention_flops(
            start, end
        ) / self.attention_rate_of(start, end)

    def attention_rate_of(self, start: int, end: int) -> float:
        """The attention rate of a step of tokens [start, end): ``attention_rate`` without a
        cached prefix; after one, ``attention_after_prefix`` (``(new tokens, FLOP/s)`` points,
        measured per step size: bench_attention) interpolated in log(new tokens), clamped at the
        ends; ``attention_rate`` when it is empty."""
        pts = self.attention_after_prefix
        if start == 0 or not pts:
            return self.attention_rate
        t = end - start
        if t <= pts[0][0]:
            return pts[0][1]
        if t >= pts[-1][0]:
            return pts[-1][1]
        for (t0, r0), (t1, r1) in itertools.pairwise(pts):
            if t0 <= t <= t1:
                w = math.log(t / t0) / math.log(t1 / t0)
                return r0 + w * (r1 - r0)
        raise AssertionError("unreachable: points are sorted")

    def with_weights_rate_from(self, model: ModelShape, tokens: int, seconds: float, source: str) -> HardwareCost:
        """Calibrate ``weights_rate`` so that a full prefill of ``tokens`` takes ``seconds``."""
        attn = model.attention_flops(0, tokens) / self.attention_rate
        if seconds <= attn:
            raise ValueError(
                f"a {tokens}-token prefill in {seconds} s leaves no time for the weights "
                f"(attention alone takes {attn:.4f} s at {self.attention_rate:.3g} FLOP/s)"
            )
        rate = model.weight_flops(0, tokens) / (seconds - attn)
        return replace(self, weights_rate=rate, sources={**self.sources, "weights_rate": source})


def _load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _case(doc: dict, name: str) -> dict | None:
    for r in doc.get("results", []):
        if r.get("case") == name:
            return r
    return None


@dataclass
class Calibration:
    """Reads kvtier's bench JSON files (bench/results) into a :class:`HardwareCost`."""

    bench_dir: str

    def _files(self, pattern: str) -> list[str]:
        return sorted(glob.glob(os.path.join(self.bench_dir, pattern)))

    def hardware(
        self,
        *,
        gpu_tag: str = "h200",
        disk_tag: str = "h200host",
        model: ModelShape | None = None,
        e2e_file: str | None = None,
        calibrate_tokens: int = 4096,
        recompute_moves_s: float = 0.0,
    ) -> HardwareCost:
        """A calibrated HardwareCost.

        Args:
            gpu_tag: file tag of the GPU benches (bench_copy_py-*-<tag>-*.json).
            disk_tag: file tag of the disk bench of the GPU machine's host.
            model, e2e_file, calibrate_tokens: calibrate ``weights_rate`` from the recompute case
                ``ttft_*_<calibrate_tokens>`` of this bench_e2e file (baseline_value), if given.
            recompute_moves_s: the part of that recompute's TTFT the model prices as chunk
                moves (the offload of GPU victims it needed), taken off before calibrating
                (kvtier.sim.validate.compare_e2e finds it by replaying the run).
        Raises:
            FileNotFoundError: a bench file the calibration needs is missing (named).
        """
        hw = HardwareCost()
        src: dict[str, str] = {}
        edoc = _load(e2e_file) if e2e_file is not None else {}
        # the copies as the run made them: its KV layout and CPU-tier copy method (a document
        # that records neither: cross_layer, auto)
        layout, method = edoc.get("kv_layout", "cross_layer"), edoc.get("method", "auto")
        py = self._files(f"bench_copy_py-*-{gpu_tag}-*.json")
        if not py:
            raise FileNotFoundError(f"no bench_copy_py-*-{gpu_tag}-*.json in {self.bench_dir}")
        doc, name = _load(py[-1]), os.path.basename(py[-1])
        for attr, case in (("h2d_bw", f"scatter_{method}_{layout}"), ("d2h_bw", f"gather_{method}_{layout}")):
            r = _case(doc, case)
            if r is None:
                raise FileNotFoundError(f"{name} has no case {case!r}")
            setattr(hw, attr, r["value"] * 1e9)
            src[attr] = f"{name}:{case}"
        r = _case(doc, "matmul_8192_beside_auto_cross_layer")
        if r is None or not r.get("baseline_value"):
            raise FileNotFoundError(f"{name} has no matmul_8192 case with a matmul_alone baseline")
        hw.attention_rate = 2.0 * 8192**3 / (r["baseline_value"] * 1e-3)
        src["attention_rate"] = f"{name}:{r['baseline']} (bf16 8192^3 matmul)"
        disk = self._files(f"bench_disk-*-{disk_tag}-*.json")
        if not disk:
            raise FileNotFoundError(f"no bench_disk-*-{disk_tag}-*.json in {self.bench_dir}")
        ddoc, dname = _load(disk[-1]), os.path.basename(disk[-1])
        for attr, base in (
            ("disk_read_bw", "device_limit_seq_odirect_read"),
            ("disk_write_bw", "device_limit_seq_odirect_write"),
        ):
            v = next((x["baseline_value"] for x in ddoc["results"] if x.get("baseline") == base), None)
            if v is None:
                raise FileNotFoundError(f"{dname} has no case with baseline {base!r}")
            setattr(hw, attr, v * 1e9)
            src[attr] = f"{dname}:{base}"
        link = self._link_cases()
        if "bw" in link:
            hw.link_bw, src["link_bw"] = link["bw"]
        if "latency" in link:
            hw.link_latency_s, src["link_latency_s"] = link["latency"]
        hw.sources = src
        if e2e_file is not None:
            if model is None:
                raise ValueError("calibrating from bench_e2e needs the model shape")
            probe = edoc.get("disk_probe")
            if probe:  # the run's own disk, measured apart from its cases: it outranks bench_disk's host
                for attr, key in (("disk_read_bw", "read_gbps"), ("disk_write_bw", "write_gbps")):
                    setattr(hw, attr, probe[key] * 1e9)
                    hw.sources[attr] = f"{os.path.basename(e2e_file)}:disk_probe.{key}"
            r = _case(edoc, f"ttft_gpu_hit_{calibrate_tokens}")
            if r is None:
                raise FileNotFoundError(f"{e2e_file} has no case ttft_gpu_hit_{calibrate_tokens}")
            if edoc.get("attention_split_min_queries"):
                hw = self._attention_after_prefix(
                    hw, edoc["attention_split_min_queries"], gpu_name_tag(edoc.get("machine", ""))
                )
            hw = hw.with_weights_rate_from(
                model,
                calibrate_tokens,
                r["baseline_value"] - recompute_moves_s,
                f"{os.path.basename(e2e_file)}:ttft_recompute_{calibrate_tokens}",
            )
            if one_step_prefill(edoc):
                # One-step prefill: a hit's single step over its cached prefix has a fixed cost
                # that the recompute's one large step hides. From ONE measurement: the GPU hit
                # at calibrate_tokens (its step's FLOPs priced as above, the rest fixed).
                computed = calibrate_tokens - (calibrate_tokens - 1) // 256 * 256
                s0 = calibrate_tokens - computed
                flops_s = hw.prefill_s(model, s0, calibrate_tokens)
                gemm_s = model.weight_flops(s0, calibrate_tokens) / hw.weights_rate
                # With measured attention rates (hit_step_overlaps) a step costs the longer of
                # the host's launches and the GEMMs, plus the attention: the GPU hit's launches
                # are its time less its attention. Without them (the matmul probe's rate for
                # attention), launches + every FLOP.
                if hw.hit_step_overlaps and r["value"] - (flops_s - gemm_s) > gemm_s:
                    fixed = r["value"] - (flops_s - gemm_s)
                else:
                    fixed = r["value"] - flops_s
                hw = replace(
                    hw,
                    hit_forward_s=max(0.0, fixed),
                    writebacks_share_disk=True,
                    sources={
                        **hw.sources,
                        "hit_forward_s": f"{os.path.basename(e2e_file)}:ttft_gpu_hit_{calibrate_tokens}",
                    },
                )
            if edoc.get("load_compute_overlap"):
                # Not a rate: how the run's engine schedules a load against the step (a fact the
                # run records), named in sources like the rates.
                hw = replace(
                    hw,
                    load_compute_overlap=True,
                    sources={
                        **hw.sources,
                        "load_compute_overlap": f"{os.path.basename(e2e_file)}:load_compute_overlap",
                    },
                )
        return hw

    def codec(self, case: str, *, decode_on_gpu: bool = False) -> tuple[CodecCost, str]:
        """The cost of a codec from the latest bench_codec_fidelity run: its ``<case>.decode`` and
        ``<case>.encode`` rates and, for a fixed-size codec, its ``<case>.compression_ratio``.
        A variable-size codec's (``byteplane_zstd``) blocks and slots keep its worst case, the
        raw bytes, so its ratio below the GPU is 1 whatever it measured. Returns the cost and
        the file it came from.

        Raises:
            FileNotFoundError: no such file, or it lacks one of the cases (named).
        """
        files = self._files("bench_codec_fidelity-*.json")
        if not files:
            raise FileNotFoundError(f"no bench_codec_fidelity-*.json in {self.bench_dir}")
        doc, name = _load(files[-1]), os.path.basename(files[-1])
        values = {}
        for what in ("compression_ratio", "decode", "encode"):
            r = _case(doc, f"{case}.{what}")
            if r is None:
                raise FileNotFoundError(f"{name} has no case {case}.{what!r}")
            values[what] = r["value"]
        ratio = 1.0 if case.startswith("byteplane") else values["compression_ratio"]
        cost = CodecCost(
            case,
            ratio=ratio,
            decode_bytes_per_s=values["decode"] * 1e9,
            encode_bytes_per_s=values["encode"] * 1e9,
            decode_on_gpu=decode_on_gpu,
        )
        return cost, f"{name}:{case}"

    def _link_cases(self) -> dict[str, tuple[float, str]]:
        """The peers' cross-host link from the bench_p2p* files: ``{"bw": (bytes/s, source),
        "latency": (s, source)}``, each key only where a case of ``LINK_BW_CASES`` /
        ``LINK_LATENCY_CASES`` has a value; for each, the first name of the list that some file
        has, from the file with the newest ``date`` (then the last file name)."""
        docs = []
        for f in self._files("bench_p2p*-*.json"):
            try:
                doc = _load(f)
            except (OSError, ValueError):
                continue
            docs.append((str(doc.get("date", "")), os.path.basename(f), doc))
        docs.sort(key=lambda d: d[:2], reverse=True)
        # a bandwidth in GB/s; a latency in a unit named here (any other is not guessed at)
        scales = {"bw": {"GB/s": 1e9}, "latency": {"us": 1e-6, "ms": 1e-3, "s": 1.0}}
        out: dict[str, tuple[float, str]] = {}
        for key, names in (("bw", LINK_BW_CASES), ("latency", LINK_LATENCY_CASES)):
            for pattern in names:
                hit = next(
                    (
                        (r["value"] * scales[key][r.get("unit")], f"{name}:{r['case']}")
                        for _, name, doc in docs
                        for r in doc.get("results", [])
                        if fnmatch.fnmatchcase(str(r.get("case", "")), pattern)
                        and r.get("value")
                        and r.get("unit") in scales[key]
                    ),
                    None,
                )
                if hit is not None:
                    out[key] = hit
                    break
        return out

    def _attention_after_prefix(self, hw: HardwareCost, split_min: int, tag: str) -> HardwareCost:
        """Attention rates of the engine that splits attention after a cached prefix from
        ``split_min`` new tokens on (bench_e2e's ``attention_split_min_queries``), from the
        latest bench_attention run on the same GPU: per step size the rate of the path that
        engine takes (SDPA's lower-right call below ``split_min``, the split from it), and for
        steps without a prefix cuDNN's causal attention (its ``limit``), replacing the matmul
        probe; and ``hit_step_overlaps``. The run's recompute and GPU hit are then calibrated
        with these (weights_rate, hit_forward_s)."""
        files = self._files(f"bench_attention-llama3_8b_after_prefix-{tag}-*.json")
        if not files:
            raise FileNotFoundError(
                f"no bench_attention-llama3_8b_after_prefix-{tag}-*.json in {self.bench_dir} (the run's engine "
                f"splits attention after a prefix; its rates come from that bench)"
            )
        doc, name = _load(files[-1]), os.path.basename(files[-1])
        pts, limits = [], []
        for r in doc["results"]:
            if not r["case"].startswith("split_"):
                continue  # the first calls of new lengths
            t = int(r["case"].removeprefix("split_").partition("_after_")[0])
            ms = r["value"] if t >= split_min else r["baseline_value"]  # the engine's path at this size
            pts.append((t, r["tflops"] * 1e12 * r["value"] / ms))  # the split's rate, scaled to that path's time
            limits.append(r["limit_value"] * 1e12)
        pts.sort()
        limits.sort()
        src = {
            **hw.sources,
            "attention_after_prefix": f"{name}: per step size, the engine's path (split from {split_min})",
            "attention_rate": f"{name}:cudnn_causal_square_tflops (median)",
        }
        return replace(
            hw,
            attention_rate=limits[len(limits) // 2],
            attention_after_prefix=tuple(pts),
            hit_step_overlaps=True,
            sources=src,
        )


def gpu_name_tag(machine: str) -> str:
    """ "NVIDIA H100 80GB HBM3, 16 cores" -> "h100" (the file tag benches give a GPU)."""
    words = machine.split(",")[0].split()
    return words[1].lower() if len(words) > 1 and words[0] == "NVIDIA" else "cpu"


def one_step_prefill(doc: dict) -> bool:
    """Whether a bench_e2e result document comes from the engine that prefills the uncached
    part of a prompt in one step: its ``prefill`` says so (a document without ``prefill``, or
    whose ``prefill`` names token steps, comes from an engine that prefilled in 256-token steps)."""
    return "prefill" in doc and "token steps" not in str(doc["prefill"])


class CalibratedPlanner:
    """A load-or-recompute planner (the kvtier.planner.LoadPlanner protocol) priced by a
    :class:`HardwareCost`: chunk ``i`` below the GPU is loaded while moving it (from its tier,
    then the scatter into GPU pages) is faster than prefilling its tokens at their position.

    The same object runs in the engine (``PagedKVPool(planner=...)``) and in the simulator
    (``SimConfig(planner=...)``): it reads only ``pool.chunk_tokens`` and
    ``pool.layout.chunk_bytes``. ``decisions`` counts chunks loaded and recomputed.
    """

    def __init__(self, hardware: HardwareCost, model: ModelShape) -> None:
        self.hw = hardware
        self.model = model
        self.decisions = {"load": 0, "recompute": 0}

    def load_s(self, tier: str, chunk_bytes: int) -> float:
        """Seconds to bring one chunk from ``tier`` ("cpu", "disk" or "peer") into GPU pages."""
        hw = self.hw
        stored = hw.stored_bytes(chunk_bytes)
        t = hw.scatter_bytes(chunk_bytes) / hw.h2d_bw + hw.codec.decode_seconds(chunk_bytes)
        if tier == "disk":
            t += stored / hw.disk_read_bw + hw.disk_latency_s
        elif tier == "peer":  # priced on the cross-host link: the plan does not know the source yet
            t += hw.peer_pull_s(stored, 1)
        return t

    def plan(self, pool, gpu_hit_chunks: int, tiers: list[str]) -> int:
        """How many of the leading lower-tier chunks to load; the rest of the prompt is recomputed."""
        ct, cb = pool.chunk_tokens, pool.layout.chunk_bytes
        n = 0
        for i, tier in enumerate(tiers):
            start = (gpu_hit_chunks + i) * ct
            if self.load_s(tier, cb) > self.hw.prefill_s(self.model, start, start + ct):
                break
            n += 1
        self.decisions["load"] += n
        self.decisions["recompute"] += len(tiers) - n
        return n
