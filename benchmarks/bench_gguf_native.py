"""GGUF-native vs fp32 vs int4 vs llama.cpp on the same GGUF file, side by side in one run.

    nice -n 10 .venv/bin/python benchmarks/bench_gguf_native.py [--threads 2] [--skip-ppl]

Speed (through ``llmopt bench``'s grid, each system in its own process, one run per cell):
single-stream decode (concurrency 1, 128 in / 128 out) and 16 x 128 / 128 end-to-end output tok/s for

- ``llmopt``: the file's own blocks (the default for a .gguf; Q4_1 projections, Q8_0 tied head),
  decode steps through the fused one-call decode step;
- ``llmopt[gguf]`` (``--op-by-op``): the same blocks, the same kernels, with the fused step off
  (``LLMOPT_FUSED_DECODE=0`` in that worker): the layer-by-layer forward, ~150 op calls per step;
- ``llmopt[fp32]``: dequantized to fp32, packed fp32 GEMM (the default before GGUF-native);
- ``llmopt[int4]``: dequantized and re-rounded to int4 g64 (int8 head), the fused decode step;
- ``llama.cpp`` (llama-cpp-python, if it imports): the same file; ``--llamacpp-path DIR`` takes it
  from DIR instead of the installed one (e.g. a build for AVX2 only, ``pip install --target DIR``),
  prepended to ``PYTHONPATH`` in the peer's process only. The run prints which build ran and its
  ``llama_print_system_info()`` (the instruction sets it was compiled for). ``LLMOPT_CPU_PATH=avx2``
  in the environment runs our side on the AVX2 kernels (the rows say which path ran).

Quality: held-out perplexity (``quant.calib.heldout_texts``, the texts of
benchmarks/bench_quant_quality.py, first ``--max-tokens`` tokens of each) of the GGUF-native model
and of the fp32 model. Prints a table of ratios; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmopt.bench.grid import LLAMACPP, Cell, GridConfig, peer_problems, run_grid

MODEL = "smollm2-135m-instruct"
OP_BY_OP = "llmopt[gguf]"  # quant "gguf" = the file's own blocks, like the default row


def _ppl(args: argparse.Namespace) -> None:
    from llmopt.models.linear import PACKED, QuantConfig
    from llmopt.models.loader import load_model
    from llmopt.quant.calib import heldout_texts, score_texts

    texts = heldout_texts()
    res = {}
    n = 0
    kinds: list[tuple[str, dict]] = [("gguf-native", {"gguf_native": True}), ("fp32", {})]
    for label, kw in kinds:
        lm = load_model(args.model, quant_config=QuantConfig(default=PACKED),
                        gguf_act=args.gguf_act if kw else "fp32", **kw)
        t = time.perf_counter()
        nll, n = score_texts(lm.model, lm.tokenizer, texts, args.max_tokens)
        res[label] = math.exp(nll / n)
        print(f"{label:12s} held-out ppl {res[label]:.4f}  ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"held-out: {len(texts)} texts, {n} scored tokens (first {args.max_tokens} per text); gguf-native / fp32 ppl = "
          f"{res['gguf-native'] / res['fp32']:.5f} ({100 * (res['gguf-native'] / res['fp32'] - 1):+.3f}%)")


def _llamacpp_env(path: str | None) -> dict[str, str]:
    """The peer process's extra environment: ``path`` (a directory holding the ``llama_cpp``
    package) first on its PYTHONPATH."""
    if not path:
        return {}
    return {"PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}


def _llamacpp_build(path: str | None) -> str:
    """Where the peer's llama_cpp comes from and its system info, from a process with the peer's
    environment (so it reports the build the bench runs)."""
    code = ("import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__), llama_cpp.__version__); "
            "print(llama_cpp.llama_print_system_info().decode(errors='replace').strip())")
    env = {**os.environ, **_llamacpp_env(path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"llama_cpp does not import{' from ' + path if path else ''}: {r.stderr.strip()[-500:]}")
    return r.stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per held-out text for the perplexity")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--gguf-act", choices=["fp32", "int8", "by-kind"], default="fp32",
                    help="activations of the GGUF-native row (KernelSettings.gguf_act, passed to the workers as "
                         "LLMOPT_GGUF_ACT; the fp32 and int4 rows do not read it)")
    ap.add_argument("--op-by-op", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the GGUF-native model with the fused decode step off (row llmopt[gguf])")
    ap.add_argument("--llamacpp-path", default=None, metavar="DIR",
                    help="run the llama.cpp peer with llama_cpp imported from DIR (prepended to its PYTHONPATH), "
                         "e.g. an AVX2-only build installed with pip install --target DIR")
    args = ap.parse_args()
    if args.llamacpp_path and not (Path(args.llamacpp_path) / "llama_cpp").is_dir():
        ap.error(f"--llamacpp-path {args.llamacpp_path}: no llama_cpp package in that directory "
                 "(install one there with pip install --target DIR llama-cpp-python)")
    os.environ["LLMOPT_GGUF_ACT"] = args.gguf_act
    os.environ.pop("LLMOPT_FUSED_DECODE", None)  # the default row runs the fused step
    print(f"command: python {' '.join(sys.argv)}")
    if args.llamacpp_path:
        # peer_problems (here and in run_grid) checks for llama_cpp with find_spec in this process:
        # without DIR on its path it drops the peer silently when llama_cpp is not installed here
        sys.path.append(str(Path(args.llamacpp_path).resolve()))
    if not args.skip_speed:
        problems = peer_problems(["llamacpp"], args.model)
        if problems and args.llamacpp_path:
            raise SystemExit(f"--llamacpp-path {args.llamacpp_path}: the llama.cpp peer cannot run: "
                             f"{'; '.join(problems.values())}")
        peers = [] if problems else ["llamacpp"]
        peer_label = "llama.cpp"
        if peers:
            build = _llamacpp_build(args.llamacpp_path)
            print(f"llama.cpp build ({'--llamacpp-path' if args.llamacpp_path else 'installed'}): {build}")
            peer_label = f"llama.cpp ({'build from --llamacpp-path' if args.llamacpp_path else 'installed build'})"
        from llmopt.kernels.gguf_linear import cpu_path

        our_path = cpu_path()
        cells = [Cell(1, 128, args.output_len), Cell(16, 128, args.output_len)]
        quants = ["fp32", "int4"] + (["gguf"] if args.op_by_op else [])
        config = GridConfig(model=args.model, cells=cells, threads=args.threads, baseline="none",
                            quants=quants, peers=peers, repeat=1,
                            system_env={OP_BY_OP: {"LLMOPT_FUSED_DECODE": "0"},
                                        LLAMACPP: _llamacpp_env(args.llamacpp_path)})
        result = run_grid(config, progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"load average {result['machine']['load_average_start']} -> {result['machine']['load_average_end']}")
        print("| cell | system | stream decode tok/s | output tok/s | gguf-native x (decode / output) |")
        print("|---|---|---|---|---|")
        for cell in result["cells"]:
            sysm = cell["systems"]
            base = sysm["llmopt"]
            for name, m in sysm.items():
                d = base["stream_decode_tokens_per_s"] / m["stream_decode_tokens_per_s"]
                o = base["output_tokens_per_s"] / m["output_tokens_per_s"]
                label = {"llmopt": f"llmopt (gguf-native, {args.gguf_act} act, fused step, {our_path})",
                         OP_BY_OP: f"llmopt (gguf-native, {args.gguf_act} act, op by op, {our_path})",
                         LLAMACPP: peer_label}.get(name, name)
                print(f"| {cell['concurrency']}x{cell['input_len']}/{cell['output_len']} | {label} | "
                      f"{m['stream_decode_tokens_per_s']:.1f} | {m['output_tokens_per_s']:.1f} | {d:.2f} / {o:.2f} |")
            same = cell.get("greedy_tokens_vs_reference", {})
            print(f"|  | greedy tokens equal to gguf-native | {same} | | |")
    if not args.skip_ppl:
        _ppl(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
