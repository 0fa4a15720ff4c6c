"""Result files of the WAN benchmark: JSON (fixed schema), a markdown table and a PNG plot."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

MODES = ("raw", "vpn", "relay", "relay-plain", "relay-accel", "dicomweb")
MODE_LABELS = {
    "raw": "raw path (no VPN)",
    "vpn": "OpenVPN",
    "relay": "relay (defaults: zstd, spill via S3)",
    "relay-plain": "relay (no compression, no spill)",
    "relay-accel": "relay, accelerated storage (end to end)",
    "dicomweb": "DICOMweb STOW-RS (Orthanc, HTTPS)",
}
COLORS = {
    "raw": "#9e9e9e",
    "vpn": "#1f77b4",
    "relay": "#d62728",
    "relay-plain": "#ff9896",
    "relay-accel": "#8c564b",
    "dicomweb": "#2ca02c",
}
# Modes whose time / VPN time is a column of the table (the goals are evaluated on "relay", the default).
RATIO_MODES = ("relay", "relay-plain", "relay-accel", "dicomweb")
# Goals from the issue, as relay time / VPN time (echo and find: added milliseconds). crdx (uncompressed
# radiographs) is held to the same goal as the uncompressed CT and MR studies.
GOALS = {"ct": 0.55, "mr": 0.55, "compressed": 1.10, "small": None, "crdx": 0.55}
LATENCY_GOALS = ("echo", "find")
# Accelerated storage (issue 13), on relay-accel: end to end (storescu's start to the last instance stored at
# the destination) / VPN time; the sender's own completion / VPN time; the first image stored at the destination
# at most one RTT + 200 ms after the VPN's. Each beside its floor: the compressed bytes on A's uplink at the
# shaper's rate, the time below which only a smaller payload could go.
ACCEL_GOALS = {"ct": 0.38, "mr": 0.30, "compressed": 0.70, "small": 0.20, "crdx": 0.48}
ACCEL_SENDER_GOALS = {"mr": 0.10, "small": 0.10}
FIRST_IMAGE_SLACK_MS = 200.0


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


def floor_seconds(rec: dict[str, object]) -> float | None:
    """The time A's uplink needs for the bytes a run put on it: the shaper's byte count (compressed payload
    with its TCP/IP headers) at the shaper's rate. That is the payload at the link's goodput, without the
    guess of a header share, and a true lower bound: the TCP probe's steady goodput is 4-5% below the rate
    because of the same headers; its whole-run figure is lower still at 100 ms (slow start)."""
    wire, link = rec.get("wire_bytes_median"), rec.get("link")
    if not isinstance(wire, dict) or not wire.get("a_uplink") or not isinstance(link, dict):
        return None
    return float(wire["a_uplink"]) / (float(link["rate_mbit"]) * 1e6 / 8)


def first_image_limit_ms(rec: dict[str, object]) -> float:
    return float(rec["link"]["rtt_ms"]) + FIRST_IMAGE_SLACK_MS  # type: ignore[index]


def accel_goals(results: list[dict[str, object]]) -> list[dict[str, object]]:
    """Issue 13's goals on relay-accel, each with its floor (as a fraction of the VPN's time) where it has one."""
    by = {(r["workload"], r["mode"]): r for r in results}
    out: list[dict[str, object]] = []
    for workload in ACCEL_GOALS:
        accel, vpn = by.get((workload, "relay-accel")), by.get((workload, "vpn"))
        if not accel or not vpn:
            continue
        base = float(vpn["seconds"]["median"])  # type: ignore[index]
        ratio = float(accel["seconds"]["median"]) / base  # type: ignore[index]
        floor = floor_seconds(accel)
        limit = ACCEL_GOALS[workload]
        out.append(
            {
                "mode": "relay-accel",
                "workload": workload,
                "kind": "end_to_end",
                "goal": f"{workload}: relay-accel end to end <= {limit}x VPN time",
                "measured": round(ratio, 3),
                "floor": round(floor / base, 3) if floor is not None else None,
                "met": ratio <= limit,
            }
        )
        sender = accel.get("sender_seconds")
        if workload in ACCEL_SENDER_GOALS and isinstance(sender, dict):
            ratio = float(sender["median"]) / base
            limit = ACCEL_SENDER_GOALS[workload]
            out.append(
                {
                    "mode": "relay-accel",
                    "workload": workload,
                    "kind": "sender",
                    "goal": f"{workload}: relay-accel sender's completion <= {limit}x VPN time",
                    "measured": round(ratio, 3),
                    "met": ratio <= limit,
                }
            )
        first, vpn_first = accel.get("first_image_seconds"), vpn.get("first_image_seconds")
        if isinstance(first, dict) and isinstance(vpn_first, dict):
            added = (float(first["median"]) - float(vpn_first["median"])) * 1000
            limit = first_image_limit_ms(accel)
            out.append(
                {
                    "mode": "relay-accel",
                    "workload": workload,
                    "kind": "first_image",
                    "goal": f"{workload}: relay-accel first image <= VPN's + one RTT + 200 ms = {limit:g} ms later",
                    "measured": round(added, 1),
                    "met": added <= limit,
                }
            )
    return out


def goals(results: list[dict[str, object]], check: dict[str, object] | None = None) -> list[dict[str, object]]:
    """Each goal of the issue with the measured value and whether it is met (`check`: the emulation check).
    `mode` says which mode a goal is evaluated on (the transparent relay's, then relay-accel's)."""
    by = {(r["workload"], r["mode"]): r for r in results}
    out: list[dict[str, object]] = []
    relay, raw = by.get(("compressed", "relay")), by.get(("compressed", "raw"))
    tcp = (check or {}).get("tcp_a_to_b")
    if relay and relay.get("mb_per_s") and isinstance(tcp, dict):
        # The goodput goal, literally: against raw TCP on the link (no DICOM, no round trips).
        link_mb_s = float(tcp["steady_mbit_s"]) / 8
        share = float(relay["mb_per_s"]) / link_mb_s  # type: ignore[arg-type]
        out.append(
            {
                "goal": f"compressed: relay goodput >= 90% of raw TCP goodput ({link_mb_s:.2f} MB/s)",
                "measured": round(share, 3),
                "met": share >= 0.9,
            }
        )
    if relay and raw and relay.get("mb_per_s") and raw.get("mb_per_s"):
        # The same, against storescu on the raw path: what DICOM itself can get from this link.
        share = float(relay["mb_per_s"]) / float(raw["mb_per_s"])  # type: ignore[arg-type]
        out.append(
            {
                "goal": "compressed: relay goodput >= 90% of the raw path's (storescu, no VPN)",
                "measured": round(share, 3),
                "met": share >= 0.9,
            }
        )
    for workload, limit in GOALS.items():
        relay = by.get((workload, "relay"))
        if limit is None or relay is None or relay["ratio_to_vpn"] is None:
            continue
        ratio = float(relay["ratio_to_vpn"])  # type: ignore[arg-type]
        out.append(
            {"goal": f"{workload}: relay time <= {limit}x VPN time", "measured": round(ratio, 3), "met": ratio <= limit}
        )
    for workload in LATENCY_GOALS:
        relay, vpn = by.get((workload, "relay")), by.get((workload, "vpn"))
        if not relay or not vpn:
            continue
        rtt = float(relay["link"]["rtt_ms"])  # type: ignore[index]
        hub_rtt = rtt / 2  # the hub sits halfway: A<->hub is half the A<->B round trip
        added = (relay["seconds"]["median"] - vpn["seconds"]["median"]) * 1000  # type: ignore[index]
        limit = hub_rtt + 20
        out.append(
            {
                "goal": f"{workload}: relay adds <= one hub RTT + 20 ms = {limit:g} ms over VPN",
                "measured": round(added, 1),
                "met": added <= limit,
            }
        )
    for g in out:
        g.setdefault("mode", "relay")
    return out + accel_goals(results)


def markdown(payload: dict[str, object]) -> str:
    results: list[dict[str, object]] = payload["results"]  # type: ignore[assignment]
    link = payload["link"]  # type: ignore[assignment]
    check = payload["emulation_check"]  # type: ignore[assignment]
    by = {(r["workload"], r["mode"]): r for r in results}
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    ratio_modes = [m for m in RATIO_MODES if m in modes]
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
        "| workload | files | MB | "
        + " | ".join(f"{m} s (min-max)" for m in modes)
        + "".join(f" | {m} / VPN" for m in ratio_modes)
        + " | goal (on relay) |",
        "|---|---:|---:|" + "---:|" * (len(modes) + len(ratio_modes)) + "---|",
    ]
    goal_text: dict[str, dict[str, object]] = {}
    for g in payload.get("goals", []):  # type: ignore[union-attr]
        # The time goal of each workload goes in its row; the rest are listed below the table.
        if g.get("mode", "relay") == "relay" and ("VPN time" in g["goal"] or "over VPN" in g["goal"]):
            goal_text.setdefault(g["goal"].split(":")[0], g)
    for w in workloads:
        first = next(r for r in results if r["workload"] == w)
        cells = []
        for m in modes:
            r = by.get((w, m))
            if r is None:
                cells.append("-")
                continue
            s = r["seconds"]  # type: ignore[index]
            if w in LATENCY_GOALS:
                cells.append(f"{s['median'] * 1000:.0f} ms ({s['min'] * 1000:.0f}-{s['max'] * 1000:.0f})")
            else:
                cells.append(f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})")
        ratios = []
        for m in ratio_modes:
            r = by.get((w, m))
            ratio = f"{r['ratio_to_vpn']:.2f}x" if r and r["ratio_to_vpn"] else "-"
            vpn = by.get((w, "vpn"))
            if w in LATENCY_GOALS and r and vpn:
                added = (r["seconds"]["median"] - vpn["seconds"]["median"]) * 1000  # type: ignore[index]
                ratio += f" ({added:+.0f} ms)"
            ratios.append(ratio)
        g = goal_text.get(w)
        goal = "-" if g is None else f"{g['goal'].split(': ', 1)[1]}: {'met' if g['met'] else '**missed**'}"
        mb = f"{first['bytes'] / 1e6:.1f}" if first["bytes"] else "-"  # type: ignore[operator]
        row = f"| {w} | {first['files']} | {mb} | " + " | ".join(cells) + "".join(f" | {x}" for x in ratios)
        lines.append(row + f" | {goal} |")
    lines += accel_table(payload, by, workloads)
    lines += first_image_table(by, workloads, modes)
    wire = [r for r in results if r.get("wire_bytes_median") and r["bytes"]]
    if wire:
        lines += [
            "",
            "Bytes on the wire (median per run): the sending site's uplink (A; B for move) in MB and as a fraction "
            "of the data set's bytes; through the relay also the bytes the bridge carried (the rest of the uplink "
            "went to the blob store).",
            "",
            "| workload | " + " | ".join(modes) + " |",
            "|---|" + "---:|" * len(modes),
        ]
        for w in workloads:
            cells = []
            for m in modes:
                r = by.get((w, m))
                wb = r.get("wire_bytes_median") if r else None
                if not wb or not r["bytes"]:  # type: ignore[index]
                    cells.append("-")
                    continue
                up = wb.get("b_uplink" if w == "move" else "a_uplink", 0)  # type: ignore[union-attr]
                cell = f"{up / 1e6:.1f} ({up / r['bytes']:.2f})"  # type: ignore[operator]
                if f"bridge_{m}" in wb:  # type: ignore[operator]
                    cell += f", bridge {wb[f'bridge_{m}'] / 1e6:.1f}"  # type: ignore[index]
                cells.append(cell)
            if any(c != "-" for c in cells):
                lines.append(f"| {w} | " + " | ".join(cells) + " |")
    listed = [
        g
        for g in payload.get("goals", [])  # type: ignore[union-attr]
        if g not in goal_text.values() and g.get("mode", "relay") != "relay-accel"
    ]
    if listed:
        lines += ["", "Other goals:", ""]
        for g in listed:
            lines.append(f"- {g['goal']}: measured {g['measured']:g}, {'met' if g['met'] else '**missed**'}")
    up = payload.get("uptime")
    if isinstance(up, dict) and up:
        lines += ["", f"Load (`uptime`) before the run: {up.get('before', '?')}; after: {up.get('after', '?')}."]
    lines += ["", f"Command: `{payload['command']}`", ""]
    return "\n".join(lines)


def _verdict(g: dict[str, object] | None, limit: str) -> str:
    return "-" if g is None else f"{limit}: {'met' if g['met'] else '**missed**'}"


def accel_table(
    payload: dict[str, object], by: dict[tuple[object, object], dict[str, object]], workloads: list[str]
) -> list[str]:
    """relay-accel against the VPN: end to end and the sender's completion, each beside its floor and goal."""
    rows = [w for w in workloads if (w, "relay-accel") in by and (w, "vpn") in by]
    if not rows:
        return []
    rate = float(by[(rows[0], "relay-accel")]["link"]["rate_mbit"])  # type: ignore[index]
    found = {(g.get("workload"), g.get("kind")): g for g in payload.get("goals", []) if g.get("mode") == "relay-accel"}  # type: ignore[union-attr]
    lines = [
        "",
        "Accelerated storage (relay-accel): end to end is storescu's start to the last instance stored at the "
        "destination (storescp's file mtimes); the sender's completion is storescu's own time (router A answers "
        "from its spool). Floor: the bytes relay-accel put on A's uplink (compressed, with their TCP/IP headers, "
        f"as the shaper counted them) at the shaper's {rate:g} Mbit/s, as a fraction of the VPN's time.",
        "",
        "| workload | VPN s | relay-accel end to end s (min-max) | / VPN | floor | goal "
        "| sender s (min-max) | / VPN | goal |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for w in rows:
        r, base = by[(w, "relay-accel")], float(by[(w, "vpn")]["seconds"]["median"])  # type: ignore[index]
        s = r["seconds"]  # type: ignore[index]
        floor = floor_seconds(r)
        up = r.get("wire_bytes_median", {}).get("a_uplink")  # type: ignore[union-attr]
        floor_cell = f"{floor:.2f} s, {floor / base:.2f}x ({up / 1e6:.1f} MB)" if floor is not None else "-"
        cells = [f"{base:.2f}", f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})", f"**{s['median'] / base:.2f}x**",
                 floor_cell, _verdict(found.get((w, "end_to_end")), f"<= {ACCEL_GOALS.get(w, '-')}x")]  # fmt: skip
        snd = r.get("sender_seconds")
        if isinstance(snd, dict):
            g = found.get((w, "sender"))
            cells += [f"{snd['median']:.2f} ({snd['min']:.2f}-{snd['max']:.2f})", f"{snd['median'] / base:.2f}x",
                      _verdict(g, f"<= {ACCEL_SENDER_GOALS.get(w)}x") if g else "-"]  # fmt: skip
        else:
            cells += ["-", "-", "-"]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return lines


def first_image_table(
    by: dict[tuple[object, object], dict[str, object]], workloads: list[str], modes: list[str]
) -> list[str]:
    """Seconds from storescu's start to the first instance stored at the destination, every C-STORE mode."""
    shown = [m for m in modes if any(by.get((w, m), {}).get("first_image_seconds") for w in workloads)]
    rows = [w for w in workloads if any(by.get((w, m), {}).get("first_image_seconds") for m in shown)]
    if not rows:
        return []
    lines = [
        "",
        "Time to the first image stored at the destination (storescu's start to the first complete file at "
        "storescp, s, median (min-max)); goal on relay-accel: at most one RTT + 200 ms after the VPN's.",
        "",
        "| workload | " + " | ".join(shown) + " | relay-accel - VPN | goal |",
        "|---|" + "---:|" * (len(shown) + 1) + "---|",
    ]
    for w in rows:
        cells = []
        for m in shown:
            f = by.get((w, m), {}).get("first_image_seconds")
            cells.append(f"{f['median']:.2f} ({f['min']:.2f}-{f['max']:.2f})" if isinstance(f, dict) else "-")
        accel, vpn = by.get((w, "relay-accel")), by.get((w, "vpn"))
        fa = accel.get("first_image_seconds") if accel else None
        fv = vpn.get("first_image_seconds") if vpn else None
        if isinstance(fa, dict) and isinstance(fv, dict) and accel is not None:
            added = (fa["median"] - fv["median"]) * 1000
            limit = first_image_limit_ms(accel)
            verdict = f"<= +{limit:g} ms: {'met' if added <= limit else '**missed**'}"
            cells += [f"{added:+.0f} ms", verdict]
        else:
            cells += ["-", "-"]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return lines


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
    transfers = [w for w in dict.fromkeys(r["workload"] for r in results) if w not in LATENCY_GOALS]
    latency = [w for w in dict.fromkeys(r["workload"] for r in results) if w in LATENCY_GOALS]
    has_echo = bool(latency)
    fig, axes = plt.subplots(
        1, 2 if has_echo else 1, figsize=(13, 5.5), gridspec_kw={"width_ratios": [4, 1.4]} if has_echo else None
    )
    axes = list(axes) if has_echo else [axes]
    width = 0.8 / max(len(modes), 1)

    def bars(ax, workloads: list[str], scale: float) -> None:
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
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, color=COLORS[m], label=MODE_LABELS[m])
            for x, y, up, w in zip(xs, ys, hi, [w for w in workloads if (w, m) in by], strict=True):
                ratio = by[(w, m)]["ratio_to_vpn"]
                if m in RATIO_MODES and ratio:
                    ax.annotate(f"{ratio:.2f}x", (x, y + up), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                                textcoords="offset points", rotation=90)  # fmt: skip
        ax.set_xticks(range(len(workloads)))
        first = {w: next(r for r in results if r["workload"] == w) for w in workloads}
        ax.set_xticklabels(
            [
                f"{w}\n{first[w]['bytes'] / 1e6:.0f} MB, {first[w]['files']} files" if first[w]["bytes"] else w  # type: ignore[operator]
                for w in workloads
            ]
        )
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.18)  # room for the ratio labels

    bars(axes[0], transfers, 1.0)
    axes[0].set_ylabel("seconds (median; bars: min-max)")
    axes[0].set_title("Transfers (DCMTK storescu -> storescp; dicomweb: STOW-RS; move: C-MOVE)", fontsize=10)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=9, frameon=False)
    if has_echo:
        bars(axes[1], latency, 1000.0)
        axes[1].set_ylabel("milliseconds")
        axes[1].set_title("association + C-ECHO / C-FIND\n+ release", fontsize=10)
    fig.suptitle(
        f"dicom-relay WAN benchmark: {link['rate_mbit']:g} Mbit/s, {link['rtt_ms']:g} ms RTT "  # type: ignore[index]
        f"(time / VPN time above the relay and DICOMweb bars)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
