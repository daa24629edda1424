"""Embedding throughput, FLOP rate and peak memory: plain SoundNet-8 vs the fast path.

    .venv/bin/python benchmarks/bench_embeddings.py            # full run, 4-7 minutes
    .venv/bin/python benchmarks/bench_embeddings.py --quick    # 10 s and 2 min clips only

Prints, in one run, two markdown tables:

1. Through the public HEAR API (``load_model(fast=...)``, ``get_scene_embeddings`` = conv7,
   ``get_timestamp_embeddings`` = conv4), for clips of 10 s (one clip and a batch of 16),
   2 min and 20 min, on 1 and 2 torch threads: seconds of audio per second (x real time) of
   the plain model and of the fast path, their ratio, the fast path's FLOP rate and its
   fraction of the machine's peak, and the peak resident memory of the whole process. Each
   configuration runs in a fresh child process, so each peak memory is its own.
2. Per layer on a 60 s clip (raw network forward): time, FLOP rate and fraction of peak of
   each block, plain and fast, to show where the time goes.

FLOPs are counted from the layer table (2 x C_in x kernel x C_out per convolution output,
before pooling) for one pass over the clip: the work the network needs, not what an
implementation happens to execute (the fast path's zero-padded conv1 products and the
chunks' context margins are overhead it pays out of this count). Peak: the best MKL sgemm
rate measured at the start of the run on the same threads (the practical ceiling: the cores
turbo above the nominal clock that a VM reports), or, if other processes held it lower, the
theoretical threads x FLOP/cycle (64 with AVX-512, 32 with AVX2) x nominal clock. Times are
medians of repeated calls; the load average printed at both ends shows a disturbed run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve()

import _util  # noqa: E402  (this directory is on sys.path when run as a script)

SAMPLE_RATE = 22050
LAYER_OF = {"scene": "conv7", "timestamp": "conv4"}


# ----------------------------------------------------------------------------------------------
# FLOP count from the layer table
# ----------------------------------------------------------------------------------------------

def conv_flops(layer: str, n_samples: int) -> int:
    """FLOPs of ``layer``'s convolution alone (multiply + add per weight and output frame)."""
    from hear_brainsoundnet.soundnet import BACKBONE_LAYERS, SPECS, output_length

    spec = SPECS[layer]
    index = BACKBONE_LAYERS.index(layer)
    frames_in = n_samples if index == 0 else output_length(BACKBONE_LAYERS[index - 1], n_samples)
    frames = (frames_in + 2 * spec.padding - spec.kernel) // spec.stride + 1
    return 2 * spec.in_channels * spec.kernel * spec.out_channels * frames


def network_flops(layer: str, n_samples: int) -> int:
    """FLOPs of conv1 .. ``layer`` for one pass over ``n_samples``."""
    from hear_brainsoundnet.soundnet import BACKBONE_LAYERS

    return sum(conv_flops(name, n_samples)
               for name in BACKBONE_LAYERS[: BACKBONE_LAYERS.index(layer) + 1])


# ----------------------------------------------------------------------------------------------
# Children: one configuration each
# ----------------------------------------------------------------------------------------------

def child_api(args: argparse.Namespace) -> dict:
    """Time one HEAR API call (scene or timestamp) on one clip length with the plain or fast path."""
    import numpy as np
    import torch

    _util.set_threads(args.threads)
    import hear_brainsoundnet as hear

    model = hear.load_model("", fast=bool(args.fast))
    rss_loaded = _util.peak_rss_mb()
    audio = _util.tiled_audio(np.load(args.audio), args.seconds, args.batch)
    embed = hear.get_scene_embeddings if args.kind == "scene" else hear.get_timestamp_embeddings
    embed(audio[:, : 10 * SAMPLE_RATE], model)  # warm-up: thread pools, first allocations
    with torch.no_grad():
        median, times = _util.median_time(lambda: embed(audio, model), repeats=args.repeats,
                                          warmup=0, budget_s=args.budget)
    return {"median_s": median, "times_s": times, "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": _util.peak_rss_mb()}


def child_layers(args: argparse.Namespace) -> dict:
    """Per-block times of the plain model and the fast path on one 60 s clip (raw forward)."""
    import numpy as np
    import torch

    from hear_brainsoundnet.checkpoints import load_pretrained
    from hear_brainsoundnet.fast import FastSoundNet
    from hear_brainsoundnet.soundnet import BACKBONE_LAYERS

    _util.set_threads(args.threads)
    plain = load_pretrained()
    fast = FastSoundNet.from_model(plain)
    audio = _util.tiled_audio(np.load(args.audio), args.seconds)
    result: dict[str, dict] = {}
    with torch.no_grad():
        x_plain = audio.unsqueeze(1) * plain.config.input_scale
        x_fast = audio.unsqueeze(-1)
        for name in BACKBONE_LAYERS:
            block, fused = plain.blocks[name], fast.blocks[name]
            t_plain, _ = _util.median_time(lambda: block(x_plain), repeats=args.repeats)
            t_fast, _ = _util.median_time(lambda: fused(x_fast), repeats=args.repeats)
            result[name] = {"plain_s": t_plain, "fast_s": t_fast}
            x_plain, x_fast = block(x_plain), fused(x_fast)
        for layer in ("conv4", "conv7"):
            t_plain, _ = _util.median_time(lambda: plain(audio, (layer,)), repeats=args.repeats)
            t_fast, _ = _util.median_time(lambda: fast(audio, (layer,)), repeats=args.repeats)
            result[f"forward {layer}"] = {"plain_s": t_plain, "fast_s": t_fast}
    return result


# ----------------------------------------------------------------------------------------------
# Parent: run every configuration and print the tables
# ----------------------------------------------------------------------------------------------

def clip_label(seconds: float, batch: int) -> str:
    text = f"{seconds / 60:g} min" if seconds >= 60 else f"{seconds:g} s"
    return text if batch == 1 else f"{batch} x {text}"


def run_api_table(clips, threads_list, repeats: int, budget: float, peaks: dict, audio: Path) -> str:
    rows = []
    for seconds, batch in clips:
        for threads in threads_list:
            for kind in ("scene", "timestamp"):
                measured = {}
                for fast in (0, 1):
                    measured[fast] = _util.run_child(HERE, [
                        "--child", "api", "--seconds", str(seconds), "--batch", str(batch),
                        "--threads", str(threads), "--kind", kind, "--fast", str(fast),
                        "--repeats", str(repeats), "--budget", str(budget), "--audio", str(audio)],
                        threads)
                audio_s = seconds * batch
                plain_x = audio_s / measured[0]["median_s"]
                fast_x = audio_s / measured[1]["median_s"]
                gflops = network_flops(LAYER_OF[kind], int(seconds * SAMPLE_RATE)) * batch \
                    / measured[1]["median_s"] / 1e9
                rows.append([clip_label(seconds, batch), threads, f"{kind} ({LAYER_OF[kind]})",
                             f"{plain_x:,.0f}x", f"{fast_x:,.0f}x", f"{fast_x / plain_x:.1f}",
                             f"{gflops:.0f}", f"{100 * gflops / peaks[threads]:.0f} %",
                             f"{measured[0]['peak_rss_mb']:,.0f}", f"{measured[1]['peak_rss_mb']:,.0f}",
                             f"{measured[1]['rss_loaded_mb']:,.0f}"])
                print(f"  done: {rows[-1][:6]}", file=sys.stderr, flush=True)
    return _util.markdown_table(
        ["clip", "threads", "embedding", "plain (x real time)", "fast (x real time)", "speed-up",
         "fast GFLOP/s", "of sgemm peak", "peak RSS plain (MB)", "peak RSS fast (MB)",
         "RSS after load (MB)"], rows)


def run_layer_table(threads_list, seconds: float, repeats: int, peaks: dict, audio: Path) -> str:
    from hear_brainsoundnet.soundnet import BACKBONE_LAYERS

    n = int(seconds * SAMPLE_RATE)
    results = {t: _util.run_child(HERE, ["--child", "layers", "--seconds", str(seconds),
                                         "--threads", str(t), "--repeats", str(repeats),
                                         "--audio", str(audio)], t)
               for t in threads_list}
    rows = []
    for name in list(BACKBONE_LAYERS) + ["forward conv4", "forward conv7"]:
        whole = name.startswith("forward")
        flops = network_flops(name.split()[-1], n) if whole else conv_flops(name, n)
        row = [name, f"{flops / seconds / 1e6:.1f}"]
        for t in threads_list:
            r = results[t][name]
            rate = flops / r["fast_s"] / 1e9
            row += [f"{1e3 * r['plain_s']:.2f}", f"{1e3 * r['fast_s']:.2f}",
                    f"{rate:.0f} ({100 * rate / peaks[t]:.0f} %)"]
        rows.append(row)
    header = ["block", "MFLOP per s of audio"]
    for t in threads_list:
        header += [f"plain ms ({t} thr)", f"fast ms ({t} thr)", f"fast GFLOP/s ({t} thr, of peak)"]
    return _util.markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 s and 2 min clips only")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per configuration")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of timed calls per configuration before stopping early")
    parser.add_argument("--child", choices=("api", "layers"), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("scene", "timestamp"), help=argparse.SUPPRESS)
    parser.add_argument("--fast", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--audio", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.threads = int(args.threads)
        print(json.dumps(child_api(args) if args.child == "api" else child_layers(args)))
        return

    import numpy as np
    import torch

    threads_list = [int(t) for t in args.threads.split(",")]
    clips = [(10.0, 1), (10.0, 16), (120.0, 1)] + ([] if args.quick else [(1200.0, 1)])
    measured = {t: _util.sgemm_gflops(t) for t in threads_list}
    clock = _util.nominal_clock_ghz()
    per_core = _util.flops_per_cycle_per_core()
    nominal = {t: t * per_core * clock for t in threads_list} if clock else {}
    # The peak a fraction is taken of: the measured sgemm rate, unless other processes held it
    # under the nominal-clock figure (the cores turbo above nominal on an idle machine).
    peaks = {t: max(measured[t], nominal.get(t, 0.0)) for t in threads_list}
    print(f"# Embedding benchmark\n\n{_util.cpu_model()}; torch {torch.__version__}; "
          f"load average at start {_util.load_average()}.")
    print("Peak single-precision rate, used for the fractions below: "
          + ", ".join(f"{peaks[t]:.0f} GFLOP/s on {t} thread(s)" for t in threads_list)
          + ". Measured MKL sgemm (2048^3, best of 7): "
          + ", ".join(f"{measured[t]:.0f}" for t in threads_list) + " GFLOP/s"
          + (f"; theoretical at the nominal clock: {per_core} FLOP/cycle/core (2 FMA units) x "
             f"{clock:.1f} GHz = {per_core * clock:.0f} GFLOP/s per core." if clock else "."))
    with tempfile.TemporaryDirectory() as tmp:
        audio = Path(tmp) / "natural_like_60s.npy"  # synthesised once, tiled by every child
        np.save(audio, _util.natural_like_base(60.0))
        print("\n## Through the HEAR API (median of repeated calls; peak RSS of the whole process)\n")
        print(run_api_table(clips, threads_list, args.repeats, args.budget, peaks, audio))
        print("\n## Per block, raw network forward on a 60 s clip (median)\n")
        print(run_layer_table(threads_list, 60.0, max(args.repeats, 7), peaks, audio))
    print(f"\nload average at end {_util.load_average()}")


if __name__ == "__main__":
    main()
