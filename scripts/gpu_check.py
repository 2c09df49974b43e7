"""The one-command check for the day a multi-GPU box is at hand: what no CPU here could prove.

    python scripts/gpu_check.py                      # every visible GPU; report in runs/gpu_check/
    python scripts/gpu_check.py -- --data_dir=/big   # flags after `--` go to every launch.py run

Four checks, each in its own process with a time limit (a crash or a hang fails that check, and the
others still run), then one JSON report, `gpu_check.json`, and exit status 0 only if every check passed:

- `overflow`: one mixed-float16 step of the engine's Trainer on two GPUs whose batch overflows float16
  on the second only, with and without XLA: every weight stays finite and equal on both, the loss scale
  halves on both (engine/trainer.agreed_gradients; XLA takes tf.distribute's path without merge_call);
- `compare`: `--job=compare` on the shipped sample (every mode in one process, so one strategy reused,
  collective all-reduces over all GPUs, mixed precision): every mode done;
- `soak`: a finetune run of `--soak_steps` steps (1,000) with XLA forced on every replica, sampling the
  process's threads and resident memory: the last third's peaks no higher than the middle third's (up to
  8 threads, 10% of memory; per-replica XLA has reports of thread exhaustion after many steps:
  tensorflow/tensorflow#56423, #56752);
- `benchmark`: configs/benchmark_gpu.flags with `--train_split=train[:5%]` (needs cats_vs_dogs and the
  ImageNet weights, downloaded once): the engine's images/sec against plain `fit` per mode.

`--cpu_replicas=N` runs the same checks on N logical CPU devices instead (how the tests run this script;
it proves the script, not the GPUs).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The soak's first third (tracing, autotuning, the first caches) is its warm-up; a leak then shows as a last
# third whose peak is above the middle third's (a pool's threads and a loop's buffers come and go alike).
MAX_THREAD_GROWTH = 8  # Threads the last third's peak may add to the middle third's.
MAX_RSS_GROWTH = 0.10  # Resident memory the last third's peak may add to the middle third's, as a share.
SMALL_SPLITS = ("--eval_split=validation[:500]", "--test_split=test[:500]")  # Of the shipped sample.


def _launch(*flags, out, timeout, watch=None):
    """Runs launch.py with `flags`; returns (ok, seconds, last lines of stderr). `watch(pid)`, if given, runs
    in a thread while it does."""
    started = time.time()
    with open(os.path.join(out, "launch.log"), "a") as log:
        log.write(f"\n$ launch.py {' '.join(flags)}\n")
        log.flush()
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch.py"), *flags], cwd=ROOT,
                                   stdout=log, stderr=subprocess.PIPE, text=True)
        watcher = watch and threading.Thread(target=watch, args=(process.pid,), daemon=True)
        if watcher:
            watcher.start()
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
            stderr += f"\ntimed out after {timeout} s"
        log.write(stderr)
    return process.returncode == 0, round(time.time() - started, 1), stderr.strip().splitlines()[-5:]


def _device_flags(args):
    return [f"--cpu_replicas={args.cpu_replicas}"] if args.cpu_replicas > 1 else []


def check_overflow(args, out):
    """The engine's Trainer on two replicas, one of whose batch overflows float16, without and with XLA."""
    code = f"""
import json, sys
sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]
from transfer_engine import internals
import tensorflow as tf
from transfer_engine.engine.core import distribute
from helpers import step_with_an_overflow_on_one_replica
if {args.cpu_replicas} > 1:
    distribute.split_cpu({args.cpu_replicas})
devices = [device.name for device in tf.config.list_logical_devices("GPU" if {args.cpu_replicas} <= 1 else "CPU")][:2]
if len(devices) < 2:
    print("null")
    sys.exit()
strategy = tf.distribute.MirroredStrategy(devices)
print(json.dumps({{name: step_with_an_overflow_on_one_replica(strategy, jit_compile=jit)
                  for name, jit in (("graph", False), ("xla", True))}}))
"""
    started = time.time()
    try:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                              timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed: timed out (a hang)", "seconds": round(time.time() - started, 1)}
    if done.returncode:
        return {"status": "failed", "error": done.stderr.strip().splitlines()[-5:]}
    steps = json.loads(done.stdout.strip().splitlines()[-1])
    if steps is None:
        return {"status": "skipped: needs 2 devices"}
    report = {"status": "ok", "seconds": round(time.time() - started, 1)}
    for name, (weights, scales, initial) in steps.items():
        replicas = list(weights.values())
        finite = all(all(abs(x) != float("inf") and x == x for x in _flat(values)) for values in replicas)
        equal = all(all(value == values[0] for value in values) for values in replicas)
        halved = scales == [initial / 2] * len(scales)
        report[name] = {"weights_finite": finite, "weights_equal_across_replicas": equal,
                        "loss_scale": scales, "initial_loss_scale": initial, "scale_halved_everywhere": halved}
        if not (finite and equal and halved):
            report["status"] = "failed"
    return report


def _flat(values):
    return [x for item in values for x in (_flat(item) if isinstance(item, list) else [item])]


def check_compare(args, out):
    """--job=compare on the shipped sample: every mode trains in one process."""
    model_dir = os.path.join(out, "compare")
    ok, seconds, error = _launch("--flagfile=configs/compare.flags", f"--model_dir={model_dir}", "--epochs=2",
                                 "--head_epochs=1", f"--steps_per_epoch={args.steps}", *SMALL_SPLITS, *_device_flags(args),
                                 *args.launch_flags, out=out, timeout=args.timeout)
    report = {"status": "ok" if ok else "failed", "seconds": seconds}
    try:
        with open(os.path.join(model_dir, "compare.json")) as f:
            modes = json.load(f)["modes"]
        report["modes"] = {name: {"status": row["status"], "test_accuracy": row.get("test_accuracy")}
                           for name, row in modes.items()}
    except (OSError, ValueError, KeyError):
        pass
    if not ok:
        report["error"] = error
    return report


def _sampler(samples):
    """A watch function: (seconds, threads, resident MB) of the process twice a second, from /proc."""
    def watch(pid):
        started = time.time()
        while True:
            try:
                with open(f"/proc/{pid}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                threads, rss = int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024
            except (OSError, KeyError, ValueError):
                return
            samples.append((time.time() - started, threads, rss))
            time.sleep(0.5)
    return watch


def check_soak(args, out):
    """--soak_steps finetune steps with XLA forced on every replica, watching threads and memory."""
    samples = []
    model_dir = os.path.join(out, "soak")
    epochs = -(-args.soak_steps // args.steps)
    ok, seconds, error = _launch(
        "--flagfile=configs/frozen.flags", f"--model_dir={model_dir}", "--mode=finetune", "--unfreeze=30",
        f"--epochs={epochs}", f"--steps_per_epoch={args.steps}", "--jit_compile=true", "--deterministic=false",
        *SMALL_SPLITS, *_device_flags(args), *args.launch_flags,
        out=out, timeout=args.timeout, watch=_sampler(samples))
    report = {"status": "ok" if ok else "failed", "seconds": seconds, "steps": epochs * args.steps,
              "samples": len(samples)}
    if not ok:
        report["error"] = error
    if len(samples) < 4:
        report["status"] = "failed" if ok else report["status"]
        report["error"] = report.get("error", []) + ["too short to watch: raise --soak_steps"]
        return report
    end = samples[-1][0]
    middle = [sample for sample in samples if end / 3 <= sample[0] < 2 * end / 3]
    last = [sample for sample in samples if sample[0] >= 2 * end / 3]
    peak = lambda part, index: max(sample[index] for sample in part)
    report["threads"] = {"peak_middle_third": peak(middle, 1), "peak_last_third": peak(last, 1)}
    report["rss_mb"] = {"peak_middle_third": round(peak(middle, 2)), "peak_last_third": round(peak(last, 2))}
    if peak(last, 1) - peak(middle, 1) > MAX_THREAD_GROWTH:
        report["status"] = "failed: threads grew"
    elif peak(last, 2) > peak(middle, 2) * (1 + MAX_RSS_GROWTH):
        report["status"] = "failed: memory grew"
    return report


def check_benchmark(args, out):
    """configs/benchmark_gpu.flags on a fifth of its split: images/sec per mode, engine against fit."""
    model_dir = os.path.join(out, "benchmark")
    ok, seconds, error = _launch("--flagfile=configs/benchmark_gpu.flags", f"--model_dir={model_dir}",
                                 "--train_split=train[:5%]", *_device_flags(args), *args.launch_flags,
                                 out=out, timeout=args.timeout)
    report = {"status": "ok" if ok else "failed", "seconds": seconds}
    try:
        with open(os.path.join(model_dir, "benchmark.json")) as f:
            benchmark = json.load(f)
        report["replicas"] = benchmark.get("replicas")
        report["rows"] = benchmark.get("rows")
        report["ratios"] = benchmark.get("ratios")
    except (OSError, ValueError):
        pass
    if not ok:
        report["error"] = error
    return report


CHECKS = {"overflow": check_overflow, "compare": check_compare, "soak": check_soak, "benchmark": check_benchmark}


def _machine(args):
    code = ("import json, tensorflow as tf\n"
            "gpus = tf.config.list_physical_devices('GPU')\n"
            "print(json.dumps({'tensorflow': tf.__version__, 'gpus': [dict(name=g.name, **{k: str(v) for k, v in "
            "tf.config.experimental.get_device_details(g).items()}) for g in gpus]}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    machine = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-500:]}
    machine.update(python=platform.python_version(), host=platform.node(), cpu_replicas=args.cpu_replicas)
    return machine


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "gpu_check"), help="report folder")
    parser.add_argument("--checks", default=",".join(CHECKS), help="which checks, comma-separated")
    parser.add_argument("--soak_steps", type=int, default=1000, help="training steps of the soak")
    parser.add_argument("--steps", type=int, default=10, help="training steps per epoch (compare, soak)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds each check may take")
    parser.add_argument("--cpu_replicas", type=int, default=0, help="logical CPU devices instead of GPUs")
    parser.add_argument("launch_flags", nargs="*", help="after --: flags for every launch.py run")
    args = parser.parse_args(argv)
    checks = [name for name in args.checks.split(",") if name]
    unknown = [name for name in checks if name not in CHECKS]
    if unknown:
        parser.error(f"--checks={args.checks}: no check {unknown[0]!r} (choose from {', '.join(CHECKS)})")
    os.makedirs(args.out, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": _machine(args), "checks": {}}
    if args.cpu_replicas <= 1 and len(report["machine"].get("gpus", [])) < 2:
        print("warning: fewer than 2 GPUs visible: the checks run, but prove nothing about several GPUs",
              file=sys.stderr)
    for name in checks:
        print(f"{name} ...", end=" ", flush=True)
        result = CHECKS[name](args, args.out)
        report["checks"][name] = result
        print(result["status"], f"({result.get('seconds', '?')} s)", flush=True)
    report["ok"] = all(not check["status"].startswith("failed") for check in report["checks"].values())
    path = os.path.join(args.out, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{'every check passed' if report['ok'] else 'FAILED'}: {path} (launch.py output in "
          f"{os.path.join(args.out, 'launch.log')})")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
