"""JAX vs PyTorch: the same MT-Diffusion training step, timed alternately in one process on one device.

  .venv/bin/pip install torch==2.13.0                   # benchmark-only extra (a CPU wheel)
  .venv/bin/python bench/vs_torch.py                    # default config, batch 16 on CPU
  .venv/bin/python bench/vs_torch.py --quick            # default config, batch 8, fewer repeats
  .venv/bin/python bench/vs_torch.py --pairs matched,project --repeats 10

Both sides: the image + class-label model of `common.build_model` (ADM U-Net of the config, label table
encoder, MLP label head), float32, NCHW / NHWC per framework, the same batch (size, images, labels), the
same initial weights (Flax init copied into the port, `torch_unet.load_flax_params`), and the same loss
(eps-MSE + aggregation MSE + label cross-entropy, t ~ U{1..T}, eps ~ N(0, I), dropout as configured).
Pairs:
  matched   JAX: jit(value_and_grad(loss) + optax.adamw), params / optimizer state donated.
            PyTorch: loss.backward() + torch.optim.AdamW(foreach=True) (zero_grad(set_to_none=True)).
  project   JAX: the project's train step (clip 1.0 -> AdamW -> EMA, non-finite guard, donated state).
            PyTorch: the same plus clip_grad_norm_ and an EMA (torch._foreach_lerp_); no non-finite guard
            (it would need a host sync or a select over every parameter, as the JAX step does).
Weight decay 0 (base_config's), on rank >= 2 weights in both when set. Threads: torch.set_num_threads(cores)
and OMP_WAIT_POLICY=PASSIVE unless set; XLA:CPU runs its own pool with one thread per core (it has no
OpenMP). Each repeat times one block of `--steps` steps of
each framework (JAX: dispatched without host sync, one block_until_ready; PyTorch CPU runs eagerly),
alternating which goes first, with a short pause between blocks so spinning worker threads go idle.
Reports per-step times (min / median / max), the JAX / PyTorch ratio per repeat (< 1: JAX faster),
parameter counts, FLOPs (XLA cost analysis; torch.utils.flop_counter for matmul / conv / attention
only), and both frameworks' [2048, 2048] matmul FLOP/s (what each gets from its BLAS / Eigen).
Writes bench/results/vs_torch_<hostname>.json (or --out).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402
import trainers  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

# On a GPU both frameworks share the device: JAX must not take 75% of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# libgomp (PyTorch's OpenMP) reads this once, when torch loads. Its default spin-waiting made PyTorch steps
# 3-10x slower on this 2-core machine shared with other jobs (measured; see bench/NOTES.md); sleeping
# workers cost little on a quiet machine. Set OMP_WAIT_POLICY=ACTIVE in the environment to compare.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import torch
except ImportError:  # pragma: no cover - the benchmark-only extra
    sys.exit("bench/vs_torch.py needs PyTorch: .venv/bin/pip install torch==2.13.0 (a CPU wheel; never unpinned)")

import torch_loss  # noqa: E402
import torch_unet  # noqa: E402


class TorchTrainer:
    """The port's training step with AdamW (and, for the 'project' pair, clip + EMA)."""

    def __init__(
        self,
        model: torch_unet.LabelMTDiffusion,
        schedule,
        batch,
        *,
        project: bool,
        device: str,
        channels_last: bool,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        clip_norm: float = 1.0,
        ema_decay: float = 0.9999,
        seed: int = 0,
    ):
        self.model, self.device, self.project = model.to(device), device, project
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model = self.model.to(memory_format=memory_format)
        self.schedule = torch_loss.ScheduleTensors(schedule, device)
        images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).to(device)  # NHWC -> NCHW
        self.images = images.contiguous(memory_format=memory_format)
        self.labels = torch.from_numpy(batch["label"]).long().to(device)
        parameters = list(self.model.parameters())
        groups = [
            {"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, foreach=True)
        self.clip_norm, self.ema_decay = clip_norm, ema_decay
        self.ema = [p.detach().clone() for p in parameters] if project else None
        self.generator = torch.Generator(device).manual_seed(seed)
        self.loss = None
        self.model.train()

    def step(self) -> None:
        loss, _ = torch_loss.training_loss(self.model, self.schedule, self.images, self.labels, self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.project:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm, foreach=True)
        self.optimizer.step()
        if self.project:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema, [p.detach() for p in self.model.parameters()], 1.0 - self.ema_decay)
        self.loss = loss.detach()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def flops(self) -> float | None:
        """matmul / conv / attention FLOPs of one forward + backward (torch.utils.flop_counter)."""
        try:
            from torch.utils.flop_counter import FlopCounterMode
        except ImportError:
            return None
        with FlopCounterMode(display=False) as counter:
            loss, _ = torch_loss.training_loss(self.model, self.schedule, self.images, self.labels, self.generator)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return float(counter.get_total_flops())


def torch_matmul_peak(device: str, size: int = 2048, repeats: int = 5, inner: int = 4) -> dict:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)

    def block(count):
        for _ in range(count):
            torch.mm(a, b)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    seconds = common.time_blocks(block, inner, repeats)
    flops = 2.0 * size**3
    return {
        "size": size,
        "dtype": "float32",
        "seconds": common.summarize(seconds),
        "flops_per_s": flops / min(seconds),
        "flops_per_s_median": flops / float(np.median(seconds)),
    }


def compare_pair(pair: str, name: str, batch_size: int, args: argparse.Namespace) -> dict:
    model, schedule = common.build_model(name)
    batch = common.make_batch(name, batch_size)
    if pair == "matched":
        jax_trainer = trainers.minimal_trainer(model, schedule, batch)
        params = jax_trainer.state[0]
    else:
        jax_trainer = trainers.project_trainer(model, schedule, batch)
        params = jax_trainer.state.params
    spec = common.BENCH_CONFIGS[name]
    port = torch_unet.LabelMTDiffusion(model.unet, spec["z_shape"], spec["num_classes"])
    torch_unet.load_flax_params(port, jax.device_get(params))  # before the first (donating) JAX step
    torch_trainer = TorchTrainer(
        port,
        schedule,
        batch,
        project=pair == "project",
        device=args.device,
        channels_last=args.torch_layout == "channels_last",
    )
    flax_params, torch_params = jax_trainer.num_params, torch_unet.count_params(port)

    print(f"[vs_torch] {pair}: compiling the JAX step ...", flush=True)
    compile_s = jax_trainer.compile()
    jax_flops, torch_flops = jax_trainer.flops(), torch_trainer.flops()
    first = {
        "jax_s": common.time_call(lambda: jax_trainer.run(1))[0],
        "torch_s": common.time_call(lambda: torch_trainer.run(1))[0],
    }
    for _ in range(args.warmup_steps):
        jax_trainer.run(1)
        torch_trainer.run(1)

    jax_seconds, torch_seconds = [], []
    for repeat in range(args.repeats):
        order = [("jax", jax_trainer, jax_seconds), ("torch", torch_trainer, torch_seconds)]
        for _, trainer, seconds in order if repeat % 2 == 0 else order[::-1]:
            time.sleep(args.pause)
            seconds.append(common.time_call(lambda: trainer.run(args.steps))[0] / args.steps)
        print(
            f"[vs_torch] {pair} repeat {repeat}: jax {jax_seconds[-1]:.3f} s, torch {torch_seconds[-1]:.3f} s, "
            f"ratio {jax_seconds[-1] / torch_seconds[-1]:.3f}",
            flush=True,
        )
    ratios = [j / t for j, t in zip(jax_seconds, torch_seconds)]
    return {
        "pair": pair,
        "config": name,
        "batch": batch_size,
        "dtype": "float32",
        "image_shape": list(spec["z_shape"]),
        "jax_step": jax_trainer.description,
        "torch_step": "loss.backward() + AdamW(foreach)" + (" + clip_grad_norm_ + EMA" if pair == "project" else ""),
        "torch_layout": args.torch_layout,
        "params": {
            "flax": flax_params,
            "torch": torch_params,
            "relative_difference": abs(torch_params - flax_params) / flax_params,
        },
        "jax_compile_s": compile_s,
        "first_step": first,
        "steps_per_block": args.steps,
        "jax_step_s": common.summarize(jax_seconds),
        "torch_step_s": common.summarize(torch_seconds),
        "ratio_jax_over_torch": common.summarize(ratios),
        "ratios": ratios,
        "jax_images_per_s": batch_size / float(np.median(jax_seconds)),
        "torch_images_per_s": batch_size / float(np.median(torch_seconds)),
        "jax_flops_per_step_xla": jax_flops,
        "torch_flops_per_step_counter": torch_flops,
        "final_loss": {"jax": jax_trainer.loss(), "torch": float(torch_trainer.loss)},
    }


COLUMNS = (
    "pair",
    "config",
    "batch",
    "flax_params",
    "torch_params",
    "jax_s_median",
    "torch_s_median",
    "ratio_min",
    "ratio_median",
    "ratio_max",
    "jax_img_s",
    "torch_img_s",
)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="default", choices=sorted(common.BENCH_CONFIGS))
    parser.add_argument("--batch_size", type=int, default=0, help="0: the config's default for the backend")
    parser.add_argument("--pairs", default="matched", help="comma-separated: matched,project")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per framework")
    parser.add_argument("--warmup_steps", type=int, default=1)
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between blocks")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    parser.add_argument("--torch_layout", default="nchw", choices=("nchw", "channels_last"))
    parser.add_argument("--device", default="", help="torch device; default cuda if JAX is on a GPU, else cpu")
    parser.add_argument("--quick", action="store_true", help="batch 8, 3 repeats of 1 step")
    parser.add_argument("--out", default="", help="JSON path; default bench/results/vs_torch_<host>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.repeats = args.batch_size or 8, 1, 3
    args.device = args.device or ("cuda" if common.backend() == "gpu" and torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    batch_size = args.batch_size or common.default_batch_size(args.config)

    environment = common.environment()
    environment["versions"]["torch"] = torch.__version__
    environment["torch_threads"] = torch.get_num_threads()
    environment["torch_parallel_info"] = torch.__config__.parallel_info()
    environment["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    peaks = {"jax": common.matmul_peak(2048, "float32"), "torch": torch_matmul_peak(args.device)}
    rows = [compare_pair(pair.strip(), args.config, batch_size, args) for pair in args.pairs.split(",") if pair.strip()]

    flat = [
        {
            "pair": r["pair"],
            "config": r["config"],
            "batch": r["batch"],
            "flax_params": r["params"]["flax"],
            "torch_params": r["params"]["torch"],
            "jax_s_median": r["jax_step_s"]["median"],
            "torch_s_median": r["torch_step_s"]["median"],
            "ratio_min": r["ratio_jax_over_torch"]["min"],
            "ratio_median": r["ratio_jax_over_torch"]["median"],
            "ratio_max": r["ratio_jax_over_torch"]["max"],
            "jax_img_s": r["jax_images_per_s"],
            "torch_img_s": r["torch_images_per_s"],
        }
        for r in rows
    ]
    print("\n" + common.table(flat, COLUMNS))
    for row in rows:
        ratio = row["ratio_jax_over_torch"]
        print(
            f"JAX/PyTorch step-time ratio ({row['pair']}, {row['config']}, batch {row['batch']}): "
            f"median {ratio['median']:.3f} (min {ratio['min']:.3f}, max {ratio['max']:.3f}) over {ratio['n']} "
            f"repeats; < 1 means JAX is faster"
        )
    print(
        f"matmul 2048^2 float32 GFLOP/s (best): jax {peaks['jax']['flops_per_s'] / 1e9:.1f}, "
        f"torch {peaks['torch']['flops_per_s'] / 1e9:.1f}"
    )
    payload = {
        "benchmark": "vs_torch",
        "environment": environment,
        "load_average_after": common.load_average(),
        "settings": vars(args),
        "matmul_peak": peaks,
        "rows": rows,
    }
    path = common.write_json(args.out or common.results_path("vs_torch"), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
