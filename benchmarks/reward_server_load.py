"""The reward server under load: N concurrent clients on loopback for a bounded time.

    python benchmarks/reward_server_load.py [--clients 32] [--seconds 10] [--batch 8] [--scorer rm|verifier]
                                            [--slow-clients 256] [--long-request]

The server (rlhf/serve/reward_server.py, default limits: one scoring call at a time, a queue of 64) runs in its own process,
scoring with a small distilled RM (a Qwen2 backbone, hidden 128, 3 layers, random weights: the quickstart RM's
shape; speed does not depend on what it learned) or the rule verifier. Each client thread keeps one HTTP/1.1
connection and posts well-formed ``/score`` batches back to back. Prints requests/s, samples/s, p50/p99 latency,
the error count (any non-200 answer or socket error; zero expected: the queue is longer than the client count) and
busy answers; the last line is one JSON object with those figures.

``--slow-clients N`` adds N attackers beside them: sockets that send a request line and then one header line every
``--slow-interval`` seconds, reconnecting whenever the server closes them (its whole-request deadline, or eviction
to make room). ``--long-request`` adds one client posting a ~900 KB sample, over the server's token limit, every
second. The normal clients' error count must stay 0; the figures add how often the attackers were cut off and the
statuses the over-long requests got (400 expected).

``--heavy-clients N [--server rm|policy]`` runs the heavy-clients case instead (benchmarks/heavy_clients.py): N
clients posting the largest valid requests beside one light client, whose p99 latency must stay within 2x its p99
alone plus one heavy request's service time.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import random
import socket
import statistics
import threading
import time


def build_scorer(kind: str, threads: int):
    if kind == "verifier":
        from reward.scoring.verifiers import final_number_correct

        return lambda prompts, responses: [float(bool(final_number_correct(r, p.rsplit("=", 1)[-1] or "0")))
                                           for p, r in zip(prompts, responses)]
    import torch

    from reward.model.distilled import DistilledRewardModel, score_texts
    from rlhf.core.config.run_config import ModelConfig
    from rlhf.core.models.build import build_student, build_tokenizer

    torch.set_num_threads(threads)
    tokenizer = build_tokenizer("char")
    student = build_student(ModelConfig(), tokenizer, seed=0)
    model = DistilledRewardModel.from_causal_lm(student, pad_token_id=tokenizer.pad_token_id).eval()
    return lambda prompts, responses: [s["quality"] for s in score_texts(model, tokenizer, prompts, responses, 64)]


MAX_TOKENS = 512  # the server's limit per prompt + response (the RM's context is longer; any limit shows the point)


def serve(kind: str, threads: int, max_queue: int, port_box) -> None:
    from rlhf.serve.reward_server import make_reward_server

    server = make_reward_server(build_scorer(kind, threads), max_queue=max_queue,
                                count_tokens=lambda p, r: len(p) + len(r) + 1, max_tokens=MAX_TOKENS)  # char tokens
    port_box.put(server.server_address[1])
    server.serve_forever(poll_interval=0.1)


def client(port: int, batch: int, until: float, seed: int, latencies: list, errors: list, busy: list) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    while time.monotonic() < until:
        prompts = [f"{rng.randint(1, 9)}+{rng.randint(1, 9)}-{rng.randint(1, 9)}=" for _ in range(batch)]
        responses = [f"{rng.randint(1, 9)}+{rng.randint(1, 9)}={rng.randint(2, 18)};#{rng.randint(0, 20)}"
                     for _ in range(batch)]
        body = json.dumps({"prompts": prompts, "responses": responses})
        start = time.perf_counter()
        try:
            conn.request("POST", "/score", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as err:
            errors.append(repr(err))
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            continue
        if response.status == 200 and len(answer.get("rewards", [])) == batch:
            latencies.append(time.perf_counter() - start)
        else:
            (busy if response.status == 503 else errors).append(f"{response.status}: {answer}")
    conn.close()


def slow_client(port: int, interval_s: float, until: float, cut: list) -> None:
    """Trickle a request's headers; count each time the server closes the connection, and start again."""
    while time.monotonic() < until:
        sock = None
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            while time.monotonic() < until:
                time.sleep(interval_s)
                sock.sendall(b"X-Slow: 1\r\n")
                sock.settimeout(0.001)
                try:
                    if sock.recv(4096) == b"":
                        raise ConnectionResetError
                except TimeoutError:
                    pass
        except OSError:
            cut.append(1)
            time.sleep(0.05)
        finally:
            if sock is not None:
                sock.close()


def long_client(port: int, until: float, statuses: list) -> None:
    """One ~900 KB response (under the 1 MB body limit, far over the token limit) every second."""
    body = json.dumps({"prompts": ["1+1="], "responses": ["9" * 900_000]})
    while time.monotonic() < until:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", "/score", body, {"Content-Type": "application/json"})
            statuses.append(conn.getresponse().status)
        except (OSError, http.client.HTTPException) as err:
            statuses.append(type(err).__name__)
        finally:
            conn.close()
        time.sleep(1.0)


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8, help="samples per request")
    parser.add_argument("--scorer", choices=("rm", "verifier"), default="rm")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server's RM")
    parser.add_argument("--max-queue", type=int, default=64, help="the server's queue limit")
    parser.add_argument("--slow-clients", type=int, default=0, help="attackers trickling headers (see above)")
    parser.add_argument("--slow-interval", type=float, default=2.0, help="seconds between their header lines")
    parser.add_argument("--long-request", action="store_true", help="add a client posting an over-long sample")
    parser.add_argument("--heavy-clients", type=int, default=0, help="the heavy-clients case (see above)")
    parser.add_argument("--server", choices=("rm", "policy"), default="rm", help="its server (heavy-clients case)")
    args = parser.parse_args()
    if args.heavy_clients:
        import heavy_clients

        return heavy_clients.main(args.server, args.heavy_clients, args.seconds, args.threads)

    ctx = mp.get_context("spawn")
    port_box = ctx.Queue()
    server = ctx.Process(target=serve, args=(args.scorer, args.threads, args.max_queue, port_box), daemon=True)
    server.start()
    try:
        port = port_box.get(timeout=120)
        latencies: list[float] = []
        errors: list[str] = []
        busy: list[str] = []
        start = time.monotonic()
        until = start + args.seconds
        cut: list[int] = []
        long_statuses: list = []
        attackers = [threading.Thread(target=slow_client, args=(port, args.slow_interval, until, cut), daemon=True)
                     for _ in range(args.slow_clients)]
        if args.long_request:
            attackers.append(threading.Thread(target=long_client, args=(port, until, long_statuses), daemon=True))
        for t in attackers:  # first, so they hold the slots when the normal clients come
            t.start()
        time.sleep(1.0 if attackers else 0.0)
        start = time.monotonic()  # the normal clients' time, from here to ``until``
        threads = [threading.Thread(target=client, args=(port, args.batch, until, k, latencies, errors, busy))
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start  # includes the last requests in flight at the deadline
        for t in attackers:
            t.join(10)
    finally:
        server.terminate()
        server.join(10)

    ms = sorted(x * 1000 for x in latencies) or [float("nan")]
    figures = {
        "scorer": args.scorer, "clients": args.clients, "seconds": round(wall, 2), "batch": args.batch,
        "requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 1),
        "samples_per_s": round(len(latencies) * args.batch / wall, 1),
        "p50_ms": round(percentile(ms, 50), 1), "p99_ms": round(percentile(ms, 99), 1),
        "errors": len(errors), "busy": len(busy),
        "slow_clients": args.slow_clients, "slow_cut": len(cut),
        "long_request_statuses": sorted({str(s) for s in long_statuses}), "long_requests": len(long_statuses),
    }
    print(f"reward server load: {args.clients} clients x {args.seconds:g} s, {args.batch} samples per request, "
          f"scorer {args.scorer}")
    print(f"{'requests/s':>12} {'samples/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'busy':>5}")
    print(f"{figures['requests_per_s']:>12} {figures['samples_per_s']:>10} {figures['p50_ms']:>8} "
          f"{figures['p99_ms']:>8} {figures['errors']:>7} {figures['busy']:>5}")
    if args.slow_clients or args.long_request:
        print(f"{args.slow_clients} slow clients cut off {len(cut)} times; {len(long_statuses)} over-long requests "
              f"answered {figures['long_request_statuses']}")
    for line in errors[:3]:
        print("error:", line)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
