"""Soak benchmark: steady mixed load on the real Serve endpoint, watching every process's memory.

Starts a local Ray + Serve on 127.0.0.1 with the `tiny` checkpoint (EP=2 by default, one replica)
and keeps a bounded pool of client threads busy for --minutes (default 30) with a fixed mix of
requests: chat (official `openai` client, plain and streaming), completions (`openai`, and
streamed over `requests`), chat with a small PNG as a data: URL (the tiny checkpoint has a vision
tower), client aborts (a stream closed after a few chunks) and bad requests (max_tokens 0, an
unknown role) that must get 400. Every good request must succeed: any failure is printed with
its reason and fails the run.

Every --sample-every seconds (default 10) it samples the RSS of each process of the deployment
(the Serve replica, each rank actor, the Serve proxy and controller; the ranks' pids come from
/v1/engine/stats) and prints requests served in the interval. At the end it reports requests by
kind, errors, p50/p95 latency, and per process the RSS once warm-up is over (the first 20% of
the run) vs at the end, the growth in %, a verdict against "flat within 5% after warm-up", and
the least-squares slope in MiB per 1000 requests to extrapolate to longer runs.

The run is bounded in time (--minutes, then in-flight requests get --request-timeout) and in
requests (--max-requests), and Serve and Ray are shut down on the way out, Ctrl-C included.
Usage: .venv/bin/python benchmarks/bench_soak.py [--minutes 30 --clients 6 --ep 2 --no-write]
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

MIB = 1 << 20
FLAT_PCT = 5.0

from soak_client import ABORT_AFTER_CHUNKS, BAD_KINDS, MIX_WEIGHTS, MODEL, Load, client_thread, png_data_url  # noqa: E402
from soak_processes import deployment_processes, engine_stats, rss_of, slope_per_1000  # noqa: E402

class HardStop(BaseException):
    """Raised in the main thread by SIGTERM, handled like Ctrl-C."""


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s) + 0.5)) - 1))]


def fmt_clock(seconds: float) -> str:
    return f"{int(seconds // 60):3d}:{int(seconds % 60):02d}"


# ---- the run -------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        description="Soak benchmark: N minutes of steady mixed load on the Serve endpoint (tiny model), "
                    "sampling the RSS of every deployment process; reports latency, errors and memory growth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    ap.add_argument("--clients", type=int, default=6, help="client threads, each with one request in flight")
    ap.add_argument("--ep", type=int, default=2, help="expert-parallel size of the one replica")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write the BENCHMARKS.md section")
    ap.add_argument("--sample-every", type=float, default=10.0, help="seconds between RSS samples / progress lines")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="fraction of the run that is warm-up; RSS growth is measured from the first sample after it")
    ap.add_argument("--max-requests", type=int, default=0,
                    help="hard bound on requests sent (0: 50 per second of --minutes)")
    ap.add_argument("--request-timeout", type=float, default=60.0, help="client timeout of each request, seconds")
    ap.add_argument("--seed", type=int, default=0, help="seed of the request mix and sampling parameters")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.clients < 1 or args.ep < 1 or not 0 <= args.warmup < 1 or args.sample_every <= 0:
        ap.error("--minutes, --sample-every > 0; --clients, --ep >= 1; 0 <= --warmup < 1")
    return args


def run_load(url: str, args, load: Load, samples: list, procs_seen: dict) -> float:
    """Runs the clients for args.minutes, sampling every args.sample_every; returns the load's
    wall time. Raises KeyboardInterrupt / HardStop through to main (clients are daemon threads)."""
    images = [png_data_url(110, 50, 1), png_data_url(64, 64, 2), png_data_url(200, 120, 3)]
    duration = args.minutes * 60
    threads = [threading.Thread(target=client_thread, args=(i, load, url, args.request_timeout, images, args.seed),
                                name=f"soak-client{i}", daemon=True) for i in range(args.clients)]
    t0 = load.t0 = time.monotonic()
    for t in threads:
        t.start()
    last_done, last_t = 0, t0
    rank_pids: dict[int, str] = {}
    next_sample = t0
    while True:
        now = time.monotonic()
        if now >= next_sample or not any(t.is_alive() for t in threads):
            stats = engine_stats(url)
            if stats:
                rank_pids = {r["pid"]: f"rank{r['rank']}" for r in stats.get("ranks", []) if r.get("pid")}
            procs = deployment_processes(rank_pids)
            rss = {name: rss_of(pid) for name, pid in procs.items()}
            for name, pid in procs.items():
                procs_seen.setdefault(name, [])
                if pid not in procs_seen[name]:
                    procs_seen[name].append(pid)
            with load.lock:
                done, errors = load.done, sum(load.error_count.values())
            elapsed = now - t0
            samples.append({"t": elapsed, "requests": done, "rss": {k: v for k, v in rss.items() if v},
                            "pids": procs, "running": stats.get("running") if stats else None})
            rate = (done - last_done) / max(now - last_t, 1e-9)
            mem = "  ".join(f"{k} {v / MIB:.1f}" for k, v in rss.items() if v)
            print(f"[{fmt_clock(elapsed)}] served {done} (+{done - last_done}, {rate:.1f}/s) errors {errors}"
                  f"{'' if stats else ' stats: n/a'} | RSS MiB: {mem}", flush=True)
            last_done, last_t = done, now
            next_sample += args.sample_every
            if not any(t.is_alive() for t in threads):
                break
        if now - t0 >= duration and not load.stop.is_set():
            load.t_end = now
            load.stop.set()
            print(f"[{fmt_clock(now - t0)}] time is up: waiting for in-flight requests "
                  f"(at most {args.request_timeout:.0f} s)", flush=True)
            hard = time.monotonic() + args.request_timeout + 15
            for t in threads:
                t.join(max(0.0, hard - time.monotonic()))
            if any(t.is_alive() for t in threads):
                print("  some client threads did not finish in time; leaving them", flush=True)
            next_sample = time.monotonic()  # one last sample, then stop
            continue
        if load.issued >= load.max_requests and not load.stop.is_set():
            load.stop.set()
            load.t_end = now
            print(f"[{fmt_clock(now - t0)}] request bound {load.max_requests} reached", flush=True)
        load.stop.wait(max(0.05, min(next_sample, t0 + duration) - time.monotonic()))
    return (load.t_end or time.monotonic()) - t0


def wait_idle(url: str, timeout: float = 30.0) -> dict | None:
    """After the load: waits for the engine to have nothing running and every KV slot free."""
    deadline = time.monotonic() + timeout
    stats = None
    while time.monotonic() < deadline:
        stats = engine_stats(url)
        if stats and stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_pages_used"] == 0:
            return stats
        time.sleep(0.5)
    return stats


def memory_report(samples: list, warm_t: float, procs_seen: dict) -> list[dict]:
    rows = []
    names = sorted({n for s in samples for n in s["rss"]})
    for name in names:
        after = [s for s in samples if s["t"] >= warm_t and name in s["rss"]]
        restarted = len(procs_seen.get(name, [])) > 1
        if not after:
            rows.append({"name": name, "base": None, "end": None, "growth": None, "slope": None,
                         "verdict": "n/a (no sample after warm-up)"})
            continue
        # only the samples of the process seen at the end (a restarted one starts over)
        pid = after[-1]["pids"].get(name)
        after = [s for s in after if s["pids"].get(name) == pid]
        base, end = after[0]["rss"][name], after[-1]["rss"][name]
        growth = 100.0 * (end - base) / base
        slope = slope_per_1000([(s["requests"], s["rss"][name] / MIB) for s in after])
        if restarted:
            verdict = "n/a (process replaced during the run)"
        elif len(after) < 2:
            verdict = "n/a (one sample after warm-up)"
        else:
            verdict = "flat" if abs(growth) <= FLAT_PCT else "GROWS" if growth > 0 else "shrinks"
        rows.append({"name": name, "base": base, "end": end, "growth": growth, "slope": slope, "verdict": verdict,
                     "samples": len(after)})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    max_requests = args.max_requests or int(50 * 60 * args.minutes)
    load = Load(max_requests, args.seed)
    samples: list[dict] = []
    procs_seen: dict[str, list[int]] = {}
    interrupted = None
    wall = 0.0
    final_stats = None

    def on_term(signum, frame):
        raise HardStop(signal.Signals(signum).name)

    # Ctrl-C and SIGTERM end the run early but still shut Serve and Ray down (ray.init installs
    # its own SIGTERM handler, a bare sys.exit, so ours goes back on once Ray is up).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    url = None
    try:
        from serve_fixtures import start_serve

        from maverick_ray.checkpoint.writer import ensure_tiny_checkpoint

        print(f"starting Serve (tiny, EP={args.ep}) ...", flush=True)
        t_start = time.monotonic()
        url = start_serve({"/": {"model": str(ensure_tiny_checkpoint()), "served_model_name": MODEL,
                                 "ep_size": args.ep, "max_num_seqs": 16, "max_model_len": 512}},
                          num_cpus=args.ep + 2)
        signal.signal(signal.SIGTERM, on_term)
        print(f"Serve up at {url} in {time.monotonic() - t_start:.0f} s; {args.clients} clients for "
              f"{args.minutes:g} min (at most {max_requests} requests), sampling every {args.sample_every:g} s",
              flush=True)
        wall = run_load(url, args, load, samples, procs_seen)
        final_stats = wait_idle(url)
    except (KeyboardInterrupt, HardStop) as e:
        interrupted = "Ctrl-C" if isinstance(e, KeyboardInterrupt) else str(e)
        with load.lock:
            load.interrupted = True
            load.stop.set()
        if load.t0 is not None:
            wall = (load.t_end or time.monotonic()) - load.t0
        print(f"\ninterrupted ({interrupted}): stopping the clients and shutting Serve down "
              f"(requests cut off by the shutdown are not counted as errors) ...", flush=True)
    finally:
        load.stop.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the shutdown finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            import ray

            if ray.is_initialized():
                from serve_fixtures import stop_serve

                stop_serve()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not samples:
        print("no samples taken")
        return 1
    return report(args, load, samples, procs_seen, wall, final_stats, interrupted, max_requests)


def report(args, load: Load, samples, procs_seen, wall, final_stats, interrupted, max_requests) -> int:
    from common import machine_line, write_section

    warm_t = args.warmup * args.minutes * 60
    good_kinds = [k for k in MIX_WEIGHTS if k not in BAD_KINDS]
    all_good = [x for k in good_kinds for x in load.latency[k]]
    good_errors = sum(load.error_count[k] for k in good_kinds)
    bad_errors = sum(load.error_count[k] for k in BAD_KINDS)
    served = load.done - load.cut_off

    lines = ["| kind | requests | errors | latency p50 | latency p95 |", "|---|---|---|---|---|"]
    for k in MIX_WEIGHTS:
        n = len(load.latency[k]) + load.error_count[k]
        lat = load.latency[k]
        lines.append(f"| {k} | {n} | {load.error_count[k]} | {pct(lat, .5) * 1e3:.0f} ms | {pct(lat, .95) * 1e3:.0f} ms |")
    lines.append(f"| all good requests | {len(all_good) + good_errors} | {good_errors} | "
                 f"{pct(all_good, .5) * 1e3:.0f} ms | {pct(all_good, .95) * 1e3:.0f} ms |")
    kinds_table = "\n".join(lines)

    mem_rows = memory_report(samples, warm_t, procs_seen)
    rate_h = served / wall * 3600 if wall else 0.0
    lines = ["| process | RSS after warm-up | RSS at end | growth | slope (MiB / 1000 requests) | "
             "MiB / hour at this rate | verdict |", "|---|---|---|---|---|---|---|"]
    for r in mem_rows:
        if r["base"] is None:
            lines.append(f"| {r['name']} | | | | | | {r['verdict']} |")
            continue
        sl = r["slope"]
        lines.append(f"| {r['name']} | {r['base'] / MIB:.1f} MiB | {r['end'] / MIB:.1f} MiB | {r['growth']:+.2f}% | "
                     + (f"{sl:+.3f} | {sl * rate_h / 1000:+.1f} |" if sl is not None else "n/a | n/a |")
                     + f" {r['verdict']} |")
    mem_table = "\n".join(lines)

    # a few samples across the run, to see the shape
    step = max(1, len(samples) // 10)
    series = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    names = [r["name"] for r in mem_rows]
    lines = ["| time | requests | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for s in series:
        lines.append(f"| {fmt_clock(s['t']).strip()} | {s['requests']} | "
                     + " | ".join(f"{s['rss'][n] / MIB:.1f}" if n in s["rss"] else "" for n in names) + " |")
    series_table = "\n".join(lines)

    checked = [r for r in mem_rows if r["verdict"] in ("flat", "GROWS", "shrinks")]
    mem_ok = bool(checked) and len(checked) == len(mem_rows) and all(r["verdict"] != "GROWS" for r in checked)
    idle_ok = bool(final_stats) and final_stats["running"] == 0 and final_stats["kv_pages_used"] == 0
    aborts_sent = len(load.latency["abort"])
    notes = [
        f"requests served: {served} in {wall / 60:.1f} min ({served / wall if wall else 0:.1f}/s), "
        f"{args.clients} clients; bound {max_requests} requests",
        f"errors on good requests: {good_errors} (goal 0); bad requests not answered 400: {bad_errors} (goal 0)",
        f"memory after warm-up (first {args.warmup:.0%} of the run, {warm_t:.0f} s): "
        + ("flat within 5% in every process" if mem_ok else
           "NOT flat within 5% in every process" if checked else "not measured (too few samples)"),
        "engine idle after the load, every KV slot free: " + (
            "not checked (interrupted)" if interrupted else "yes" if idle_ok else f"NO ({final_stats})"),
    ]
    if final_stats:
        notes.append(f"engine finish reasons: {final_stats.get('finished')} (client aborts sent: {aborts_sent}); "
                     f"rank failures {final_stats.get('rank_failures') or 0}, recoveries "
                     f"{final_stats.get('recoveries') or 0}")
    replaced = {n: p for n, p in procs_seen.items() if len(p) > 1}
    if replaced:
        notes.append(f"processes replaced during the run (pids): {replaced}")
    if interrupted:
        notes.append(f"run interrupted ({interrupted}) after {wall / 60:.1f} min: figures are partial; "
                     f"{load.cut_off} requests cut off by the shutdown")
    if load.errors:
        reasons = Counter(f"{k}: {e.split(':', 1)[0]}" for _, k, e in load.errors)
        notes.append("error reasons: " + "; ".join(f"{r} x{n}" for r, n in reasons.most_common()))

    print()
    print(kinds_table)
    print()
    print(mem_table)
    print()
    print(series_table)
    print()
    for n in notes:
        print("- " + n)
    ok = good_errors == 0 and bad_errors == 0 and mem_ok and idle_ok and not interrupted
    print(f"\nverdict: {'PASS' if ok else 'FAIL'}")

    if not args.no_write and not interrupted:
        cmd = ".venv/bin/python benchmarks/bench_soak.py" + "".join(
            f" --{k.replace('_', '-')} {v:g}" if isinstance(v, float) else f" --{k.replace('_', '-')} {v}"
            for k, v in (("minutes", args.minutes), ("clients", args.clients), ("ep", args.ep))
            if v != {"minutes": 30.0, "clients": 6, "ep": 2}[k])
        body = (f"## Soak: steady mixed load on the Serve endpoint\n\n"
                f"Tiny model, EP={args.ep}, one replica, {args.minutes:g} minutes, {args.clients} client threads "
                f"with one request in flight each (official `openai` client and `requests`): chat and completions, "
                f"plain and streamed, chat with a PNG data: URL, client aborts after {ABORT_AFTER_CHUNKS} chunks, "
                f"bad requests (max_tokens 0, unknown role) that must get 400. RSS of every deployment process "
                f"every {args.sample_every:g} s; growth is measured from the first sample after warm-up (the first "
                f"{args.warmup:.0%} of the run) to the end, the slope is a least-squares fit of RSS over requests "
                f"served after warm-up. Machine: {machine_line()}.\n\n"
                f"{kinds_table}\n\n{mem_table}\n\nRSS (MiB) across the run:\n\n{series_table}\n\n"
                + "\n".join("- " + n for n in notes)
                + f"\n- verdict: {'PASS' if ok else 'FAIL'} (zero errors, 400s for bad requests, memory flat within "
                  f"{FLAT_PCT:g}% after warm-up, engine idle afterwards)\n\nCommand: `{cmd}`\n")
        write_section("bench_soak", body)
        print("wrote the bench_soak section of BENCHMARKS.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
