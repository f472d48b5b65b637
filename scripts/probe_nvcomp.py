"""nvCOMP's GPU codecs on bf16 KV (a diagnostic; needs a CUDA GPU and the nvidia-nvcomp-cu13
wheel): for each algorithm, the compression ratio and the encode / decode GB/s (of the input
bytes, on the GPU, median of 5) of 64 MiB of bf16 values, whole and split into byte planes (the
high byte: sign and 7 exponent bits; the low byte: the last exponent bit and the mantissa), and
whether the decode gives the input back bit for bit. The input is random normal values (a
trained model's KV may compress differently).

    python scripts/probe_nvcomp.py
"""

from __future__ import annotations

import statistics
import time
import traceback

import torch

ALGORITHMS = ("ANS", "Bitcomp", "Cascaded", "GDeflate", "Deflate", "LZ4", "Zstd", "Snappy")
MIB = 64


def _time(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from nvidia import nvcomp

    print("nvcomp", nvcomp.__version__, "cuda", nvcomp.__cuda_version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(MIB << 19, generator=g, device="cuda").to(torch.bfloat16)
    raw = values.view(torch.uint8)
    pairs = raw.view(-1, 2)
    inputs = {
        "bf16 whole": raw,
        "high bytes": pairs[:, 1].contiguous(),
        "low bytes": pairs[:, 0].contiguous(),
        "bf16 as 16 MiB pieces x4": [raw[i * (16 << 20) : (i + 1) * (16 << 20)] for i in range(4)],
    }
    for algo in ALGORITHMS:
        try:
            codec = nvcomp.Codec(algorithm=algo)
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"{algo}: no codec ({type(e).__name__}: {e})")
            continue
        for name, t in inputs.items():
            try:
                if isinstance(t, list):
                    arrays = [nvcomp.as_array(x) for x in t]
                    nbytes = sum(x.numel() for x in t)
                    enc = codec.encode(arrays)
                    out_bytes = sum(e.buffer_size for e in enc)
                    t_enc = _time(lambda a=arrays, c=codec: c.encode(a))
                    dec = codec.decode(enc)
                    same = all(
                        torch.equal(torch.as_tensor(d, device="cuda").view(torch.uint8).view(-1), x)
                        for d, x in zip(dec, t, strict=True)
                    )
                    t_dec = _time(lambda e=enc, c=codec: c.decode(e))
                else:
                    arr = nvcomp.as_array(t)
                    nbytes = t.numel()
                    enc = codec.encode(arr)
                    out_bytes = enc.buffer_size
                    t_enc = _time(lambda a=arr, c=codec: c.encode(a))
                    dec = codec.decode(enc)
                    same = torch.equal(torch.as_tensor(dec, device="cuda").view(torch.uint8).view(-1), t)
                    t_dec = _time(lambda e=enc, c=codec: c.decode(e))
                print(
                    f"{algo:9s} {name:26s} ratio {nbytes / out_bytes:6.3f}  encode {nbytes / t_enc / 1e9:7.1f} GB/s"
                    f"  decode {nbytes / t_dec / 1e9:7.1f} GB/s  bit-exact {same}",
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{algo} {name}: {type(e).__name__}: {e}")
                traceback.print_exc(limit=2)
    print("Codec:", [n for n in dir(nvcomp.Codec) if not n.startswith("_")])
    print("Array:", [n for n in dir(nvcomp.Array) if not n.startswith("_")])


if __name__ == "__main__":
    main()
