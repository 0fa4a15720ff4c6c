"""Result files of the WAN benchmark: JSON (fixed schema), a markdown table and a PNG plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

MODES = ("raw", "vpn", "relay")
MODE_LABELS = {"raw": "raw path (no VPN)", "vpn": "OpenVPN", "relay": "relay (inline)"}
# Goals from the issue, as relay time / VPN time (echo: added milliseconds).
GOALS = {"ct": 0.55, "mr": 0.55, "compressed": 1.10, "small": None}


def summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def record(
    workload: str, mode: str, link: dict[str, float], files: int, nbytes: int, samples: Sequence[float]
) -> dict[str, object]:
    s = summary(samples)
    return {
        "workload": workload,
        "mode": mode,
        "link": link,
        "files": files,
        "bytes": nbytes,
        "seconds": s,
        "mb_per_s": nbytes / s["median"] / 1e6 if nbytes else None,
        "ratio_to_vpn": None,  # filled in by add_ratios
        "samples_s": list(samples),
    }


def add_ratios(results: list[dict[str, object]]) -> None:
    vpn = {r["workload"]: r["seconds"]["median"] for r in results if r["mode"] == "vpn"}  # type: ignore[index]
    for r in results:
        base = vpn.get(r["workload"])
        r["ratio_to_vpn"] = r["seconds"]["median"] / base if base else None  # type: ignore[index]


def goals(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """Each goal of the issue with the measured value and whether it is met."""
    by = {(r["workload"], r["mode"]): r for r in results}
    out: list[dict[str, object]] = []
    for workload, limit in GOALS.items():
        relay = by.get((workload, "relay"))
        if limit is None or relay is None or relay["ratio_to_vpn"] is None:
            continue
        ratio = float(relay["ratio_to_vpn"])  # type: ignore[arg-type]
        out.append(
            {"goal": f"{workload}: relay time <= {limit}x VPN time", "measured": round(ratio, 3), "met": ratio <= limit}
        )
    echo_relay, echo_vpn = by.get(("echo", "relay")), by.get(("echo", "vpn"))
    if echo_relay and echo_vpn:
        rtt = float(echo_relay["link"]["rtt_ms"])  # type: ignore[index]
        hub_rtt = rtt / 2  # the hub sits halfway: A<->hub is half the A<->B round trip
        added = (echo_relay["seconds"]["median"] - echo_vpn["seconds"]["median"]) * 1000  # type: ignore[index]
        limit = hub_rtt + 20
        out.append(
            {
                "goal": f"echo: relay adds <= one hub RTT + 20 ms = {limit:g} ms over VPN",
                "measured": round(added, 1),
                "met": added <= limit,
            }
        )
    return out


def markdown(payload: dict[str, object]) -> str:
    results: list[dict[str, object]] = payload["results"]  # type: ignore[assignment]
    link = payload["link"]  # type: ignore[assignment]
    check = payload["emulation_check"]  # type: ignore[assignment]
    by = {(r["workload"], r["mode"]): r for r in results}
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    lines = [
        f"# WAN benchmark: {link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT "  # type: ignore[index]
        f"({link['congestion_control']}), median of {payload['repeats']}",  # type: ignore[index]
        "",
        f"Emulation check: raw TCP A->B {check['tcp_a_to_b']['mbit_s']:.2f} Mbit/s "  # type: ignore[index]
        f"(steady {check['tcp_a_to_b']['steady_mbit_s']:.2f}), idle ping A->B "  # type: ignore[index]
        f"{check['ping_a_to_b']['rtt_ms']['median']:.2f} ms, A->hub "  # type: ignore[index]
        f"{check['ping_a_to_hub']['rtt_ms']['median']:.2f} ms"  # type: ignore[index]
        + (
            f"; through the VPN {check['tcp_vpn']['mbit_s']:.2f} Mbit/s, "  # type: ignore[index]
            f"ping {check['ping_vpn']['rtt_ms']['median']:.2f} ms"  # type: ignore[index]
            if "tcp_vpn" in check  # type: ignore[operator]
            else ""
        )
        + ".",
        "",
        "| workload | files | MB | " + " | ".join(f"{m} s (min-max)" for m in modes) + " | relay / VPN | goal |",
        "|---|---:|---:|" + "---:|" * len(modes) + "---:|---|",
    ]
    goal_text = {g["goal"].split(":")[0]: g for g in payload.get("goals", [])}  # type: ignore[union-attr]
    for w in workloads:
        first = next(r for r in results if r["workload"] == w)
        cells = []
        for m in modes:
            r = by.get((w, m))
            if r is None:
                cells.append("-")
                continue
            s = r["seconds"]  # type: ignore[index]
            if w == "echo":
                cells.append(f"{s['median'] * 1000:.0f} ms ({s['min'] * 1000:.0f}-{s['max'] * 1000:.0f})")
            else:
                cells.append(f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})")
        relay = by.get((w, "relay"))
        ratio = f"{relay['ratio_to_vpn']:.2f}x" if relay and relay["ratio_to_vpn"] else "-"
        g = goal_text.get(w)
        goal = "-" if g is None else f"{g['goal'].split(': ', 1)[1]}: {'met' if g['met'] else '**missed**'}"
        if w == "echo" and g is not None:
            ratio += f" ({g['measured']:+.0f} ms)"
        mb = f"{first['bytes'] / 1e6:.1f}" if first["bytes"] else "-"  # type: ignore[operator]
        lines.append(f"| {w} | {first['files']} | {mb} | " + " | ".join(cells) + f" | {ratio} | {goal} |")
    lines += ["", f"Command: `{payload['command']}`", ""]
    return "\n".join(lines)


def plot(payload: dict[str, object], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    results: list[dict[str, object]] = payload["results"]  # type: ignore[assignment]
    link = payload["link"]  # type: ignore[assignment]
    by = {(r["workload"], r["mode"]): r for r in results}
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    transfers = [w for w in dict.fromkeys(r["workload"] for r in results) if w != "echo"]
    has_echo = any(r["workload"] == "echo" for r in results)
    fig, axes = plt.subplots(
        1, 2 if has_echo else 1, figsize=(11, 5), gridspec_kw={"width_ratios": [4, 1]} if has_echo else None
    )
    axes = list(axes) if has_echo else [axes]
    colors = {"raw": "#9e9e9e", "vpn": "#1f77b4", "relay": "#d62728"}
    width = 0.8 / max(len(modes), 1)

    def bars(ax, workloads: list[str], scale: float) -> None:  # noqa: ANN001
        for i, m in enumerate(modes):
            xs, ys, lo, hi = [], [], [], []
            for j, w in enumerate(workloads):
                r = by.get((w, m))
                if r is None:
                    continue
                s = r["seconds"]  # type: ignore[index]
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                ys.append(s["median"] * scale)
                lo.append((s["median"] - s["min"]) * scale)
                hi.append((s["max"] - s["median"]) * scale)
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=colors[m], label=MODE_LABELS[m])
            for x, y, up, w in zip(xs, ys, hi, [w for w in workloads if (w, m) in by], strict=True):
                ratio = by[(w, m)]["ratio_to_vpn"]
                if m == "relay" and ratio:
                    ax.annotate(f"{ratio:.2f}x", (x, y + up), ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                                textcoords="offset points")  # fmt: skip
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels(
            [f"{w}\n{by[(w, modes[0])]['bytes'] / 1e6:.0f} MB, {by[(w, modes[0])]['files']} files" for w in workloads]
            if workloads and workloads[0] != "echo"
            else workloads
        )
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.12)  # room for the ratio labels

    bars(axes[0], transfers, 1.0)
    axes[0].set_ylabel("seconds (median; bars: min-max)")
    axes[0].set_title("C-STORE with DCMTK storescu -> storescp")
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=len(modes), fontsize=9, frameon=False)
    if has_echo:
        bars(axes[1], ["echo"], 1000.0)
        axes[1].set_ylabel("milliseconds")
        axes[1].set_title("C-ECHO\n(associate, echo, release)", fontsize=10)
    fig.suptitle(
        f"dicom-relay WAN benchmark: {link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT "  # type: ignore[index]
        f"(relay/VPN time ratio above the red bars)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
