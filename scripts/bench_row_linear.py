"""Time `lightvlm::row_linear` (the decode step's few-row linear) on a bench profile's decoder weights.

    .venv/bin/python scripts/bench_row_linear.py --profile cpu-small --rows 1 2 3 4 6 8 --base HEAD~1

One pass = every fused decoder linear of the model once (q/k/v, o, gate/up, down of each layer), as
a decode step runs them; reported as the median pass time and the weight bytes read per second,
beside the machine's read bandwidth (a sum over 256 MB). With `--base REV`, that commit's kernel
(built under a namespace of its own) runs in the same process, alternating pass by pass with the
working tree's: on a shared VM only such in-process comparisons separate changes of a few percent.
Run it with the runtime environment of `lightvlm serve` (README, "Runtime environment").
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lightvlm_core import cpu_kernels, fusion  # noqa: E402
from lightvlm_core.bench.common import service_runner  # noqa: E402
from lightvlm_core.bench.decode import read_bandwidth  # noqa: E402
from lightvlm_core.bench.profiles import PROFILES, build  # noqa: E402


def base_kernel(rev: str, into: Path):
    """`rev`'s row_linear, built as `lightvlmbase::row_linear`."""
    from torch.utils.cpp_extension import load

    kernels = into / "kernels"
    kernels.mkdir()
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "lightvlm_core/kernels/"],
                            check=True, capture_output=True, text=True).stdout.split()
    headers = [Path(path).name for path in listed if path.endswith(".h")]
    for name in ("row_linear.cpp", *headers):
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:lightvlm_core/kernels/{name}"], check=True,
                              capture_output=True, text=True).stdout
        (kernels / name).write_text(text.replace(
            "TORCH_LIBRARY_IMPL(lightvlm, CPU, m)",
            'TORCH_LIBRARY(lightvlmbase, m) { m.def("row_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }\n'
            "TORCH_LIBRARY_IMPL(lightvlmbase, CPU, m)"))
    load("lightvlmbase_row_linear", [str(kernels / "row_linear.cpp")], is_python_module=False,
         extra_cflags=cpu_kernels.CFLAGS, extra_ldflags=cpu_kernels.LDFLAGS)
    return torch.ops.lightvlmbase.row_linear


def decoder_weights(profile: str) -> list[torch.Tensor]:
    """The weights a decode step multiplies by, fused as the engine fuses them."""
    adapter = service_runner(build(PROFILES[profile])).adapter
    weights = []
    for layer in adapter.text_model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = getattr(attention, fusion.QKV_ATTR, None), getattr(mlp, fusion.GATE_UP_ATTR, None)
        weights += [qkv.weight] if qkv is not None else [attention.q_proj.weight, attention.k_proj.weight,
                                                         attention.v_proj.weight]
        weights.append(attention.o_proj.weight)
        weights += [gate_up.weight] if gate_up is not None else [mlp.gate_proj.weight, mlp.up_proj.weight]
        weights.append(mlp.down_proj.weight)
    return weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-small")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8])
    parser.add_argument("--base", help="a commit whose kernel to compare against")
    parser.add_argument("--passes", type=int, default=15)
    args = parser.parse_args()
    if not cpu_kernels.kernels_built():
        sys.exit("the CPU kernels are not built here (an AVX-512 CPU and a C++ compiler are needed)")
    weights = decoder_weights(args.profile)
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    kernels = {"working tree": torch.ops.lightvlm.row_linear}
    with tempfile.TemporaryDirectory() as tmp:
        if args.base:
            kernels = {f"base {args.base}": base_kernel(args.base, Path(tmp)), **kernels}
        print(f"{args.profile}: {len(weights)} linears, {megabytes:.1f} MB a pass; "
              f"read bandwidth {read_bandwidth(torch.device('cpu')) / 1e9:.1f} GB/s")
        for rows in args.rows:
            inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
            for kernel in kernels.values():  # the kernels agree before they are timed
                torch.testing.assert_close(kernel(inputs[weights[0].shape[1]], weights[0], None),
                                           inputs[weights[0].shape[1]] @ weights[0].T, atol=1e-4, rtol=1e-4)
            times: dict[str, list[float]] = {label: [] for label in kernels}
            for _ in range(args.passes):
                for label, kernel in kernels.items():
                    start = time.perf_counter()
                    for w in weights:
                        kernel(inputs[w.shape[1]], w, None)
                    times[label].append(time.perf_counter() - start)
            medians = {label: statistics.median(t) * 1e3 for label, t in times.items()}
            line = "  ".join(f"{label} {ms:.2f} ms ({megabytes / ms:.1f} GB/s)" for label, ms in medians.items())
            ratio = f"  time {list(medians.values())[-1] / list(medians.values())[0]:.2f}x" if args.base else ""
            print(f"{rows} rows: {line}{ratio}", flush=True)


if __name__ == "__main__":
    main()
