"""Human-readable end-of-run table: global vs proxy, and bytes vs FedAvg+LoRA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def format_summary(summary: Mapping[str, Any]) -> str:
    g, p = summary["global"], summary["proxy"]
    names = list(g)
    lines = [
        f"{summary['algorithm']} on {summary['task']} with {summary['model']}: {summary['rounds']} rounds, "
        f"{summary['wall_s']:.0f} s",
        "",
        f"{'metric (round ' + str(summary['final_round']) + ')':<22}{'global':>12}{'proxy':>12}{'gap':>10}",
    ]
    for name in names:
        lines.append(f"{name:<22}{g[name]:>12.3f}{p[name]:>12.3f}{g[name] - p[name]:>+10.3f}")
    b, ref, ratio = (
        summary["bytes_per_client_per_round"],
        summary["fedavg_lora_bytes_per_client_per_round"],
        summary["ratio_to_fedavg_lora"],
    )
    lines += [
        "",
        f"{'bytes / client / round':<22}{'this run':>14}{'FedAvg+LoRA':>14}{'ratio':>10}",
        f"{'down (server->client)':<22}{_kib(b['down']):>14}{_kib(ref['down']):>14}{ratio['down']:>9.3f}x",
        f"{'up (client->server)':<22}{_kib(b['up']):>14}{_kib(ref['up']):>14}{ratio['up']:>9.3f}x",
    ]
    if "privacy" in summary:
        lines += ["", summary["privacy"]["statement"]]
    if "stopped" in summary:
        lines += ["", f"stopped early: {summary['stopped']}"]
    return "\n".join(lines)
