"""Shared evaluator service vs one CLIP model per client.

N concurrent clients (Ray tasks, like trials) each score M images:
  shared:   one `evaluator.remote` actor loads the model once and batches every request;
  separate: each client loads its own `ClipModel` and scores its images itself.
Wall time (first client submitted -> last result; for `shared` also with the service start
included) and the peak of the summed RSS of every process involved (the clients' workers and,
for `shared`, the service actor), sampled with psutil every 50 ms. Each repeat runs in a fresh
Ray instance in a fresh process, so no worker or cache carries over between modes.

No weights can be downloaded here, so the model is a real-size open_clip architecture with
random weights (pretrained=None): loading cost and memory are those of the real model; the
scores are meaningless and not compared.

    .venv/bin/python bench/evaluator.py --model ViT-B-32 --clients 8 --images 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class RssMonitor(threading.Thread):
    """Samples the RSS of every descendant of this process (Ray's workers among them)."""

    def __init__(self, period_s: float = 0.05):
        super().__init__(daemon=True)
        self.period_s = period_s
        self.samples: list[dict[int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self._halt.is_set():
            sample = {}
            for p in me.children(recursive=True):
                try:
                    sample[p.pid] = p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append(sample)
            time.sleep(self.period_s)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak_total(self, pids: set[int]) -> int:
        """Highest simultaneous sum of the RSS of `pids` (bytes)."""
        return max((sum(rss for pid, rss in s.items() if pid in pids) for s in self.samples),
                   default=0)


def _images(seed: int, n: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def run_mode(mode: str, model: str, clients: int, images: int, size: int, threads: int) -> dict:
    import ray

    ray.init(num_cpus=clients + 2, include_dashboard=False, log_to_driver=False)
    prompts = [f"a photo number {i}" for i in range(images)]

    @ray.remote(num_cpus=1)
    def shared_client(seed: int) -> tuple[int, float]:
        from evaluator.remote import connect_evaluator, score_remote

        h = connect_evaluator("bench-evaluator", timeout_s=600)
        out = score_remote(h, _images(seed, images, size), prompts, timeout_s=600)
        return os.getpid(), out["clip_score"]

    @ray.remote(num_cpus=1)
    def separate_client(seed: int) -> tuple[int, float]:
        import torch

        from evaluator.clip_model import ClipModel
        from evaluator.score import score_images

        torch.set_num_threads(threads)
        clip = ClipModel.load(model, None, device="cpu")
        out = score_images(clip, _images(seed, images, size), prompts)
        return os.getpid(), out["clip_score"]

    # Workers up and idle before the clock starts, in both modes (a sweep's trial processes
    # exist anyway); what is timed is loading the model(s) and scoring.
    ray.get([ray.remote(num_cpus=1)(lambda: os.getpid()).remote() for _ in range(clients)])
    monitor = RssMonitor()
    monitor.start()
    t0 = time.perf_counter()
    pids, service_s = set(), 0.0
    if mode == "shared":
        from evaluator.remote import start_evaluator

        h = start_evaluator("bench-evaluator", model, None, num_cpus=1, torch_threads=threads,
                            max_batch_size=64, max_wait_ms=20, detached=False, timeout_s=600)
        pids.add(ray.get(h.info.remote())["pid"])
        service_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    fn = shared_client if mode == "shared" else separate_client
    out = ray.get([fn.remote(i) for i in range(clients)])
    end = time.perf_counter()
    monitor.stop()
    pids |= {pid for pid, _ in out}
    result = {"mode": mode, "wall_s": end - t0, "clients_wall_s": end - t1,
              "service_start_s": service_s, "peak_rss_gib": monitor.peak_total(pids) / 2**30,
              "processes": len(pids)}
    if mode == "shared":
        from evaluator.remote import evaluator_stats

        st = evaluator_stats(h)
        result.update(batches=st["batches"], batch_sizes=st["batch_sizes"],
                      model_loads=st["model_loads"])
    ray.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--images", type=int, default=32, help="images per client")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per model copy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write every run and the medians here")
    ap.add_argument("--one", choices=["shared", "separate"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child process: one run, JSON on the last line
        print(json.dumps(run_mode(args.one, args.model, args.clients, args.images, args.size,
                                  args.threads)))
        return
    runs = []
    for r in range(args.repeats):
        for mode in ("shared", "separate"):
            cmd = [sys.executable, __file__, "--one", mode, "--model", args.model, "--clients",
                   str(args.clients), "--images", str(args.images), "--size", str(args.size),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"repeat {r}: {json.dumps(runs[-1])}", flush=True)
    med = {m: {k: statistics.median(x[k] for x in runs if x["mode"] == m)
               for k in ("wall_s", "clients_wall_s", "peak_rss_gib")}
           for m in ("shared", "separate")}
    s, p = med["shared"], med["separate"]
    summary = {"config": vars(args), "median": med,
               "speedup_incl_service_start": p["wall_s"] / s["wall_s"],
               "speedup_warm_service": p["wall_s"] / s["clients_wall_s"],
               "memory_ratio_shared_over_separate": s["peak_rss_gib"] / p["peak_rss_gib"]}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
