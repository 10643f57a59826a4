"""What `maverick-ray plan` prints: the per-rank table, the verdict, and the Serve and KubeRay values
that deploy the planned engine (configs/maverick-gpu.yaml and k8s/rayservice-maverick-gpu.yaml
show where each goes)."""

from __future__ import annotations

import json
import math

from .plan import GIB, Plan


def serve_values(p: Plan) -> dict:
    """The Serve application's args and deployment options for this plan. kv_cache_memory_gb is the
    plan's KV budget, so each rank's cache gets the pages the plan counts (kv_cache_fraction, used
    only when it is 0, is left out)."""
    wl = p.workload
    worker = {"CPU": wl.cpus_per_worker, "GPU": 1}
    args = {"ep_size": p.ep, "placement_strategy": "PACK" if p.cluster.nodes == 1 else "SPREAD",
            "num_gpus_per_worker": 1, "num_cpus_per_worker": wl.cpus_per_worker, "dtype": "bfloat16",
            "max_model_len": wl.max_model_len, "max_num_seqs": p.max_num_seqs,
            "max_prefill_tokens": wl.max_prefill_tokens, "kv_cache_memory_gb": p.kv_cache_memory_gb,
            "kv_block_size": wl.kv_block_size, "replica_num_cpus": wl.replica_cpus}
    if not wl.vision:
        args["max_images"] = 0
    deployment = {"ray_actor_options": {"num_cpus": wl.replica_cpus},
                  "placement_group_bundles": [{"CPU": wl.replica_cpus}] + [worker] * p.ep,
                  "placement_group_strategy": "PACK" if p.cluster.nodes == 1 else "SPREAD"}
    return {"args": args, "deployment": deployment}


def kuberay_values(p: Plan) -> dict:
    """One engine's worker pods: a pod per node, its GPUs, CPUs, and the host memory the ranks
    need while loading (the loader stages a rank's weights in host memory before moving them
    to the GPU, so a pod holds ranks_per_pod x a rank's weights at once during start-up)."""
    per_pod = math.ceil(p.ep / p.cluster.nodes)
    wl = p.workload
    staging = per_pod * (p.rank_dense + p.rank_experts)
    return {"worker_pods_per_engine": p.cluster.nodes, "gpus_per_pod": p.cluster.gpus, "ranks_per_pod": per_pod,
            "cpus_per_pod_min": per_pod * wl.cpus_per_worker + wl.replica_cpus,
            "host_memory_per_pod_min_gib": math.ceil(staging / GIB * 1.1),
            "head_pod_gpus": 0}


def plan_json(p: Plan) -> str:
    d = p.to_dict()
    d.update(serve=serve_values(p), kuberay=kuberay_values(p))
    return json.dumps(d, indent=2)


def _g(n: int) -> str:
    return f"{n / GIB:8.2f} GiB"


def render(p: Plan) -> str:
    """The human-readable plan."""
    wl, c, kv = p.workload, p.cluster, p.kv
    L = wl.max_model_len
    lines = [
        f"model {p.model}, {p.dtype}: {p.weights.total / GIB:.1f} GiB of weights "
        f"({p.weights.num_experts} routed experts of {p.weights.per_expert / GIB:.2f} GiB each)",
        f"cluster: {c.nodes} node(s) x {c.gpus} GPU(s) of {c.gpu_memory_gib:g} GiB; EP = {p.ep} "
        f"(one rank per GPU, {p.experts_per_rank} experts on the fullest rank)",
        "",
        "per rank (GPU)",
        f"  dense weights (replicated on every rank)   {_g(p.rank_dense)}",
        f"  routed-expert shard ({p.experts_per_rank:3d} experts)         {_g(p.rank_experts)}",
        f"  vision tower + projector                   {_g(p.rank_vision)}"
        + ("" if wl.vision else "   (text only: never loaded)"),
        f"  activations, largest step (estimate)       {_g(p.activations)}"
        f"   (prefill chunk of {wl.max_prefill_tokens} tokens + decodes, context {L})",
        f"  overhead (CUDA context, NCCL, slack)       {_g(p.overhead)}",
        f"  left for the KV cache                      {_g(p.kv_budget)}",
        "",
        f"KV cache (bf16, paged): blocks of {kv.block_size} tokens; {kv.layers} layers in {kv.layout.num_groups} "
        f"groups of {kv.layout.layers_per_group}: {kv.layers - kv.local_layers} global layers keep every token, "
        + (f"{kv.local_layers} chunked layers only the current {kv.chunk}-token attention chunk; "
           if kv.local_layers else "")
        + f"a page (one block of a group) is {kv.page_bytes:,} B",
        f"  paged (what the engine allocates): {p.kv_pages_per_seq} pages, {kv.paged_per_seq(L) / GIB:.2f} GiB per "
        f"sequence of {L}; kv_cache_memory_gb {p.kv_cache_memory_gb:g} -> {p.kv_pages} pages -> {p.seqs_paged} "
        f"sequences per rank, {p.seqs_paged * p.ep} per engine",
        f"  slot design before paging (max_model_len reserved in every layer): {kv.slot_per_seq(L) / GIB:.2f} GiB "
        f"per sequence -> {p.seqs_slots} per rank, {p.seqs_slots * p.ep} per engine",
        "",
        f"verdict: {p.verdict}",
        f"reference (not this engine's layout): all weights spread evenly over the {c.total_gpus} GPUs, as "
        f"tensor-parallel servers hold them, is {p.reference_even_split / GIB:.1f} GiB per GPU, "
        f"{p.reference_even_split_left / GIB:.1f} GiB left after the same overhead",
    ]
    for note in p.notes:
        lines.append(f"note: {note}")
    if p.max_num_seqs:
        s, k = serve_values(p), kuberay_values(p)
        bundles = s["deployment"]["placement_group_bundles"]
        lines += ["", "Serve config (applications[].args, and the deployment's options):"]
        lines += [f"  {key}: {json.dumps(v)}" for key, v in s["args"].items()]
        lines += [f"  ray_actor_options: {json.dumps(s['deployment']['ray_actor_options'])}",
                  f"  placement_group_strategy: {s['deployment']['placement_group_strategy']}",
                  f"  placement_group_bundles: [{json.dumps(bundles[0])}] + [{json.dumps(bundles[1])}] x {p.ep}",
                  "", "KubeRay (per engine):",
                  f"  worker pods: {k['worker_pods_per_engine']}, nvidia.com/gpu per pod: {k['gpus_per_pod']}, "
                  f"ranks per pod: {k['ranks_per_pod']}",
                  f"  cpu per pod >= {k['cpus_per_pod_min']:g}, memory per pod >= {k['host_memory_per_pod_min_gib']}Gi "
                  f"(the ranks stage their weights in host memory while loading); head pod: no GPUs"]
    return "\n".join(lines)
