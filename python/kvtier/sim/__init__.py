"""kvtier.sim: a trace-driven simulator of tiered and disaggregated KV-cache deployments.

It answers capacity-planning questions before anything is bought -- how much DRAM and NVMe, how
many instances and peers, which eviction policy -- by replaying a request trace through
simulated GPU / CPU / disk tiers that follow the engine's semantics exactly and take the same
Python policy objects, priced by a cost model calibrated from kvtier's own benchmark results.
See docs/sim.md.
"""

from kvtier.sim.cost import MODEL_PRESETS, CalibratedPlanner, Calibration, HardwareCost, ModelShape
from kvtier.sim.engine import ROUTINGS, SimConfig, SimResult, Simulator, tier_ablation
from kvtier.sim.mooncake_synthetic import MooncakeSynthetic, synthetic_requests, write_mooncake_trace
from kvtier.sim.trace import Request, TraceError, load_trace, synthetic_trace, trace_summary

__all__ = [
    "MODEL_PRESETS",
    "ROUTINGS",
    "CalibratedPlanner",
    "Calibration",
    "HardwareCost",
    "ModelShape",
    "MooncakeSynthetic",
    "Request",
    "SimConfig",
    "SimResult",
    "Simulator",
    "TraceError",
    "load_trace",
    "synthetic_requests",
    "synthetic_trace",
    "tier_ablation",
    "trace_summary",
    "write_mooncake_trace",
]
