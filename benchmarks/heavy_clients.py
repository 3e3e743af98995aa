"""The heavy-clients case of benchmarks/reward_server_load.py (issue 37), on either server:

    python benchmarks/reward_server_load.py --heavy-clients 4 --server rm|policy [--seconds 20]

Heavy clients post large requests back to back (reward server: 16 samples at its 512-token limit, sized so one
takes seconds on a shared 2-core box; policy server, a random quickstart-shaped student with 512 positions: a
256-token prompt, n=16, 256 new tokens); one light client posts the smallest (one short sample; a 4-token greedy
answer) back to back. Three phases: the light client alone, one heavy request at a time (its service time), then the heavy
clients and the light client together. The target: the light client's p99 latency with the heavy clients at most
2x its p99 alone plus one heavy request's service time, and the server's peak memory (VmHWM) bounded. The last
line is one JSON object with the figures.
"""
from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import statistics
import threading
import time

RM_MAX_TOKENS, RM_HEAVY_SAMPLES = 512, 16
POLICY_POSITIONS, POLICY_HEAVY_N = 512, 16


def serve(kind: str, threads: int, port_box) -> None:
    import torch

    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, build_tokenizer

    torch.set_num_threads(threads)
    tokenizer = build_tokenizer("char")
    if kind == "rm":
        from reward_server_load import build_scorer

        from rlhf.serve.reward_server import make_reward_server

        server = make_reward_server(build_scorer("rm", threads), count_tokens=lambda p, r: len(p) + len(r) + 1,
                                    max_tokens=RM_MAX_TOKENS)
    else:
        from rlhf.serve.policy_server import make_server

        model = build_student(ModelConfig(max_position_embeddings=POLICY_POSITIONS), tokenizer, seed=0)
        server = make_server((model, tokenizer), port=0, model_name="student")
    port_box.put(server.server_address[1])
    server.serve_forever(poll_interval=0.1)


def requests(kind: str) -> tuple[str, dict, dict]:
    """(path, light body, heavy body)."""
    if kind == "rm":
        heavy = {"prompts": ["1+2="] * RM_HEAVY_SAMPLES, "responses": ["7" * (RM_MAX_TOKENS - 6)] * RM_HEAVY_SAMPLES}
        return "/score", {"prompts": ["1+2="], "responses": ["3"]}, heavy
    half = POLICY_POSITIONS // 2
    light = {"messages": [{"role": "user", "content": "1+2="}], "max_tokens": 4, "temperature": 0}
    heavy = {"messages": [{"role": "user", "content": "1+2=" * (half // 4)}], "max_tokens": half,
             "n": POLICY_HEAVY_N}
    return "/v1/chat/completions", light, heavy


def post_loop(port: int, path: str, body: dict, until: float, latencies: list, statuses: list,
              once: bool = False) -> None:
    """Post ``body`` back to back on one connection until ``until`` (or once); 200s' latencies in seconds."""
    data = json.dumps(body)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    while time.monotonic() < until:
        start = time.perf_counter()
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            if response.status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                time.sleep(0.1)
        except (OSError, http.client.HTTPException) as err:
            statuses.append(type(err).__name__)
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        if once:
            break
    conn.close()


def p99(values: list[float]) -> float:
    ms = sorted(v * 1000 for v in values)
    return statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else (ms or [float("nan")])[0]


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def run(kind: str, heavy_clients: int, seconds: float, threads: int) -> dict:
    ctx = mp.get_context("spawn")
    port_box = ctx.Queue()
    server = ctx.Process(target=serve, args=(kind, threads, port_box), daemon=True)
    server.start()
    path, light, heavy = requests(kind)
    try:
        port = port_box.get(timeout=180)
        alone: list[float] = []
        post_loop(port, path, light, time.monotonic() + seconds / 3, alone, [])
        service: list[float] = []
        for _ in range(3):
            post_loop(port, path, heavy, float("inf"), service, [], once=True)
        rss_before_load = peak_rss_mb(server.pid)
        until = time.monotonic() + seconds
        light_lat, light_statuses, heavy_lat, heavy_statuses = [], [], [], []
        workers = [threading.Thread(target=post_loop, args=(port, path, heavy, until, heavy_lat, heavy_statuses))
                   for _ in range(heavy_clients)]
        for worker in workers:
            worker.start()
        time.sleep(min(1.0, seconds / 10))  # the heavy clients are in the queue when the light one starts
        post_loop(port, path, light, until, light_lat, light_statuses)
        for worker in workers:
            worker.join()
        rss = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.join(10)
    heavy_s = statistics.median(service)
    bound_ms = 2 * p99(alone) + heavy_s * 1000
    return {"server": kind, "heavy_clients": heavy_clients, "seconds": seconds,
            "light_p99_alone_ms": round(p99(alone), 1), "heavy_service_ms": round(heavy_s * 1000, 1),
            "light_p99_with_heavy_ms": round(p99(light_lat), 1), "bound_ms": round(bound_ms, 1),
            "within_bound": p99(light_lat) <= bound_ms, "light_requests": len(light_lat),
            "heavy_requests": len(heavy_lat), "light_statuses": sorted({str(s) for s in light_statuses}),
            "heavy_statuses": sorted({str(s) for s in heavy_statuses}),
            "peak_rss_mb_before_load": round(rss_before_load), "peak_rss_mb": round(rss)}


def main(kind: str, heavy_clients: int, seconds: float, threads: int) -> None:
    figures = run(kind, heavy_clients, seconds, threads)
    print(f"{kind} server, {heavy_clients} heavy clients x {seconds:g} s: light p99 {figures['light_p99_alone_ms']} "
          f"ms alone, {figures['light_p99_with_heavy_ms']} ms with them (bound {figures['bound_ms']} ms: 2x alone + "
          f"one heavy request, {figures['heavy_service_ms']} ms); peak RSS {figures['peak_rss_mb']} MB")
    print(json.dumps(figures))
