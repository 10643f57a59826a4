"""`maverick-ray top`: the expert-load view in the terminal, from a running deployment's /v1/expert-load."""

from __future__ import annotations

import json
import sys
import time
import urllib.request

SHADES = " .:-=+*#%@"


def render(d: dict, width: int = 64) -> str:
    lines = [f"maverick-ray top  EP={d.get('ep_size')}  experts={d.get('num_experts')}  "
             f"window={d.get('window_steps')} steps  running={d['stats']['running']}  waiting={d['stats']['waiting']}"]
    if not d.get("layers"):
        return "\n".join(lines + ["(no routed tokens yet)"])
    lines.append("layer  balanced  imbalance  idle   expert load (darker = more tokens)")
    for i, layer in enumerate(d["moe_layers"]):
        row = d["expert_load"][i]
        top = max(row) or 1
        step = max(1, -(-len(row) // width))
        cells = [max(row[j:j + step]) for j in range(0, len(row), step)]
        heat = "".join(SHADES[min(len(SHADES) - 1, round(c / top * (len(SHADES) - 1)))] for c in cells)
        lines.append(f"{layer:>5}  {d['balancedness'][i]:8.3f}  {d['imbalance'][i]:9.2f}  "
                     f"{100 * d['idle_fraction'][i]:3.0f}%  |{heat}|")
    ranks = [sum(layer[r] for layer in d["rank_load"]) for r in range(len(d["rank_load"][0]))]
    lines.append("rank load: " + "  ".join(f"r{r}={n}" for r, n in enumerate(ranks)))
    placement = d.get("placement")
    if placement:
        copied = {e: n for e, n in enumerate(placement["replicas"]) if n > 1}
        lines.append("slots: " + "  ".join(f"r{r}={slots}" for r, slots in enumerate(placement["slots"])))
        lines.append("copies: " + (", ".join(f"expert {e} x{n}" for e, n in copied.items()) or "none"))
    eplb = (d.get("stats") or {}).get("eplb")
    if eplb:
        last = ("" if eplb["last_imbalance_before"] is None else
                f"; last: imbalance {eplb['last_imbalance_before']:.2f} -> {eplb['last_imbalance_planned']:.2f} "
                f"planned, {eplb['moved_slots']} slots moved in all")
        lines.append(f"rebalances: {eplb['rebalances']} done, {eplb['failed']} failed"
                     + (", staging now" if eplb["staging"] else "") + last)
    return "\n".join(lines)


def fetch(url: str, api_key: str | None = None) -> dict:
    req = urllib.request.Request(url.rstrip("/") + "/v1/expert-load")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def run(url: str, interval: float, once: bool, api_key: str | None = None) -> int:
    while True:
        try:
            text = render(fetch(url, api_key))
        except OSError as e:
            print(f"error: cannot reach {url}: {e}", file=sys.stderr)
            return 1
        if once:
            print(text)
            return 0
        sys.stdout.write("\x1b[2J\x1b[H" + text + "\n")
        sys.stdout.flush()
        time.sleep(interval)
