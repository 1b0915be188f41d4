"""What `cadenza profile` does (the command is cadenza.cli.profile): run a file of prompts, count which experts
each token used per layer, and write the counts (the popularity file that `--placement` reads), a heatmap, and what
popularity placement would keep on the GPU compared with even placement."""

from __future__ import annotations

import json
from pathlib import Path

from cadenza.errors import CadenzaError
from cadenza.moe.placement import GiB, format_size, parse_size
from cadenza.moe.trace import ExpertTrace


def read_prompts(path: str | Path) -> list[str | list[dict]]:
    """One prompt per line; or JSON lines, each {"messages": [...]}, a bare messages list, or {"prompt": "..."}.
    Blank lines are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CadenzaError(f"Prompt file {path} does not exist. Give a text file with one prompt per line.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CadenzaError(f"Prompt file {path} cannot be read ({e}). Give a UTF-8 text file.") from None
    prompts: list[str | list[dict]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        item: object = line
        if line.lstrip().startswith(("{", "[")):
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                item = line  # a text prompt that happens to start with a bracket
        if isinstance(item, dict):
            if "messages" in item:
                item = item["messages"]
            elif isinstance(item.get("prompt"), str):
                item = item["prompt"]
            else:
                raise CadenzaError(
                    f'{path} line {n}: a JSON object needs "messages" (a chat) or "prompt" (text); it has '
                    f"{sorted(item)}. Fix the line."
                )
        if isinstance(item, list) and not all(isinstance(m, dict) and "role" in m for m in item):
            raise CadenzaError(f'{path} line {n}: a chat must be a list of {{"role": ..., "content": ...}} messages.')
        prompts.append(item)
    if not prompts:
        raise CadenzaError(f"Prompt file {path} holds no prompts. Put one prompt per line.")
    return prompts


def placement_shares(llm, counts: list[list[int]], budgets: list[int]) -> list[dict]:
    """Per budget: the share of the traced expert work on GPU-resident experts under popularity and even
    placement."""
    out = []
    for budget in budgets:
        pop = llm._plan(budget, "cpu", popularity=counts)
        even = llm._plan(budget, "cpu", popularity=None)
        out.append({
            "gpu_memory": budget,
            "resident_experts": pop.resident_count,
            "total_experts": pop.total_experts,
            "popularity_share": round(pop.expected_gpu_share(counts), 4),
            "even_share": round(even.expected_gpu_share(counts), 4),
        })  # fmt: skip
    return out


def default_budgets(llm) -> list[int]:
    """Budgets that keep about a quarter, half and three quarters of the experts resident."""
    base = llm._plan(10**6 * GiB, "cpu", popularity=None)  # everything fits: just the fixed sizes
    fixed = base.always_bytes + base.kv_bytes + base.workspace_bytes
    experts = base.expert_gpu_bytes  # every expert resident (layers may store them in different sizes)
    return [fixed + int(f * experts) for f in (0.25, 0.5, 0.75)]


def heatmap(counts: list[list[int]], path: Path, title: str) -> bool:
    """A layers x experts PNG of each expert's share of its layer's work; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    m = np.array(counts, dtype=float)
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(max(6, m.shape[1] * 0.12 + 2), max(3, m.shape[0] * 0.15 + 1.5)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of the layer's routed work")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_profile(llm, prompts, params, out: Path, budgets: list[int] | None) -> dict:
    """Runs the prompts together with a trace attached; writes `out` (JSON) and a PNG beside it."""
    if llm.sizes.num_moe_layers == 0:
        raise CadenzaError("This model has no routed experts: there is nothing to profile.")
    ids = [llm.chat_prompt(p) if isinstance(p, list) else llm._prompt_ids(p) for p in prompts]
    with ExpertTrace(llm.model) as trace:
        results = llm.engine.generate_many([(i, params) for i in ids])
        counts = trace.counts()
    budgets = budgets or default_budgets(llm)
    report = {
        "model": str(llm.checkpoint.path),
        "prompts": len(ids),
        "prompt_tokens": sum(len(i) for i in ids),
        "generated_tokens": sum(len(g.token_ids) for g in results),
        "num_moe_layers": len(counts),
        "num_experts": len(counts[0]),
        "counts": counts,
        "placement": placement_shares(llm, counts, budgets),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    png = out.with_suffix(".png")
    report["heatmap"] = str(png) if heatmap(counts, png, f"expert popularity: {llm.checkpoint.path.name}") else None
    return report


def summary(report: dict) -> str:
    lines = [
        f"profiled {report['prompts']} prompts: {report['prompt_tokens']} prompt + {report['generated_tokens']} "
        f"generated tokens over {report['num_moe_layers']} MoE layers x {report['num_experts']} experts"
    ]
    for row in report["placement"]:
        lines.append(
            f"  GPU {format_size(row['gpu_memory'])}: {row['resident_experts']}/{row['total_experts']} experts "
            f"resident keep {row['popularity_share']:.1%} of expert work on the GPU by popularity, "
            f"{row['even_share']:.1%} spread evenly"
        )
    if report.get("heatmap") is None:
        lines.append("  (no heatmap: matplotlib is not installed; pip install matplotlib)")
    else:
        lines.append(f"  heatmap: {report['heatmap']}")
    return "\n".join(lines)


def parse_budgets(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    return [parse_size(v, "--budget") for item in values for v in item.split(",") if v.strip()]


__all__ = ["parse_budgets", "read_prompts", "run_profile", "summary"]
