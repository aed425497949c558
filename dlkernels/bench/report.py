"""The report of a run, built only from pytest-benchmark's JSON (its "dlkernels" section): a
terminal table (rich), a markdown report and PNG charts. Nothing here is typed in by hand."""
from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from .measure import COMPILED, EAGER

_MARK = {"FAILED": "FAILED", "error": "ERROR", "unavailable": "n/a"}


@dataclass
class Row:
    case: str
    group: str
    bound: str
    dtype: str
    recs: dict            # contender -> record

    @property
    def eager(self) -> float | None:
        r = self.recs.get(EAGER)
        return _median(r) if r else None


def _median(rec: dict) -> float | None:
    return statistics.median(rec["samples"]) if rec.get("status") == "ok" and rec.get("samples") else None


def _spread(rec: dict) -> float:
    s = sorted(rec["samples"])
    if len(s) < 2:
        return 0.0
    q = statistics.quantiles(s, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(s)


def rows_of(meta: dict) -> list[Row]:
    rows: dict = {}
    for rec in meta["records"]:
        key = (rec["case"], rec["dtype"])
        if key not in rows:
            rows[key] = Row(rec["case"], rec["group"], rec["bound"], rec["dtype"], {})
        rows[key].recs[rec["contender"]] = rec
    return list(rows.values())


def contenders_of(rows: list[Row]) -> list[str]:
    seen = dict.fromkeys([EAGER, COMPILED])
    for r in rows:
        seen.update(dict.fromkeys(r.recs))
    return [c for c in seen if any(c in r.recs for r in rows)]


def copy_rate_of(rec: dict, limits: dict) -> float:
    """The copy bandwidth a memory-bound case is held to: the copy timed in the case's own rounds
    where there is one (CPU), else the run's best."""
    return rec.get("copy_bytes_per_s") or limits["copy_bytes_per_s"]


def fraction(rec: dict, limits: dict | None) -> float | None:
    """Achieved share of the machine's limit: memory-bound cases of the copy bandwidth, compute-bound
    cases of the arithmetic peak in the same dtype (a CPU's; elsewhere, or in reports from before it was
    measured, the large torch.matmul's FLOP/s)."""
    t = _median(rec)
    if t is None or not limits:
        return None
    if rec["bound"] == "memory" and rec["bytes"]:
        return rec["bytes"] / t / copy_rate_of(rec, limits)
    if rec["bound"] == "compute" and rec["flops"]:
        peak = limits.get("peak_flops", {}).get(rec["dtype"]) or limits["matmul_flops"].get(rec["dtype"])
        return rec["flops"] / t / peak if peak else None
    return None


def floor_s(row: Row, limits: dict | None) -> float | None:
    rec = next(iter(row.recs.values()))
    if not limits or row.bound != "memory" or not rec["bytes"]:
        return None
    return rec["bytes"] / copy_rate_of(rec, limits)


def _fmt_t(t: float) -> str:
    return f"{t * 1e6:.1f} µs" if t < 1e-3 else f"{t * 1e3:.3g} ms"


def cell(rec: dict | None, eager: float | None) -> str:
    if rec is None:
        return "-"
    if rec["status"] != "ok":
        return _MARK[rec["status"]] + (f" (err {rec['max_err']:.1e})" if rec["status"] == "FAILED" else "")
    t = _median(rec)
    if t is None:
        return "ok (untimed)"
    ratio = f" {eager / t:.3g}x" if eager and rec["contender"] != EAGER else ""
    return f"{_fmt_t(t)}{ratio} ±{_spread(rec) * 50:.0f}%"


def failures(meta: dict) -> list[dict]:
    return [r for r in meta["records"] if r["status"] in ("FAILED", "error")]


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------
def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def summary(rows: list[Row], conts: list[str]) -> list[list[str]]:
    """Per op group and contender: geometric-mean speed-up over eager and ok/failed/unavailable counts."""
    out = []
    groups = dict.fromkeys(r.group for r in rows)
    for g in groups:
        grs = [r for r in rows if r.group == g and r.bound != "overhead"]
        real = [r for r in grs if next(iter(r.recs.values()))["tier"] > 0]
        grs = real or grs  # tiny smoke-test shapes say nothing about speed unless nothing else ran
        line = [g, str(len(grs))]
        for c in conts:
            if c == EAGER:
                continue
            recs = [r.recs[c] for r in grs if c in r.recs]
            gm = _geomean([r.eager / _median(r.recs[c]) for r in grs
                           if c in r.recs and _median(r.recs[c]) and r.eager])
            bad = sum(x["status"] in ("FAILED", "error") for x in recs)
            na = sum(x["status"] == "unavailable" for x in recs)
            txt = f"{gm:.3g}x" if gm else "-"
            if bad:
                txt += f", {bad} FAILED"
            if na:
                txt += f", {na} n/a"
            line.append(txt)
        out.append(line)
    return out


def _md_table(head: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in body]
    return "\n".join(lines)


def markdown(meta: dict, charts: list[str]) -> str:
    m, lim, tim = meta["machine"] or {}, meta["limits"], meta["timing"]
    rows = rows_of(meta)
    conts = contenders_of(rows)
    v = m.get("versions", {})
    out = ["# dlkernels benchmark and accuracy report", ""]
    out += [f"Measured by `python -m dlkernels bench --preset {meta['preset']}` on {m.get('date', '?')}.", "",
            f"- device: **{m.get('device')}** ({m.get('device_name')}); CPU: {m.get('cpu')}, {m.get('cores')} cores, "
            f"torch threads {m.get('torch_threads')}, last-level cache {m.get('llc_bytes', 0) >> 20} MiB",
            "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
            f"- allocator: {m.get('allocator')}",
            f"- fp32 matmul precision (torch): {m.get('fp32_matmul_precision')}",
            f"- timing: {tim['method']}; contenders interleaved in up to {tim['rounds']} rounds after warm-up "
            f"(JIT, autotune, compile excluded); median per call, ± half the interquartile range",
            f"- accuracy: {meta['tolerance']['rule']}; base {meta['tolerance']['base']}. "
            "A contender over it is FAILED and not timed."]
    if lim:
        flops = ", ".join(f"{k} {f / 1e9:.0f} GFLOP/s" for k, f in lim["matmul_flops"].items())
        samples = lim.get("copy_samples") or [lim["copy_bytes_per_s"]]
        seen = (f"the best of {len(samples)} measurements through the run, "
                f"{min(samples) / 1e9:.1f}-{max(samples) / 1e9:.1f} GB/s; " if len(samples) > 1 else "")
        out += [f"- machine limits, measured in this run: copy bandwidth "
                f"{lim['copy_bytes_per_s'] / 1e9:.1f} GB/s ({seen}read+write, torch copy of "
                f"{lim['copy_size_bytes'] >> 20} MiB); torch.matmul {lim['matmul_size']}³: {flops}"
                + ("; arithmetic peak (multiply-add chains in registers, every thread, the C++ build's vector ISA): "
                   + ", ".join(f"{k} {f / 1e9:.0f} GFLOP/s" for k, f in lim["peak_flops"].items())
                   if lim.get("peak_flops") else "")]
    out += ["", "Cells: median time per call, speed-up over PyTorch eager (>1 is faster), spread. "
            "`FAILED`: wrong answer; `n/a`: not available here (reason below). "
            "Floor: the fewest bytes the pass must move at the copy bandwidth (memory-bound cases; on a CPU the "
            "copy timed in the case's own rounds, beside its contenders, shown after the @: a shared host's bandwidth "
            "moves within minutes, and the run's best would hold a case timed in a slow moment to a fast moment's "
            "floor). Limit: achieved GB/s of that copy bandwidth, or FLOP/s of the arithmetic peak above (where "
            "measured; else of the torch.matmul above), by the best contender "
            "(on a CPU, torch's copy stores through the cache, reading each line before it writes it, so a pass "
            "that streams its output with non-temporal stores can pass 100 %).",
            "", "## Summary (geometric mean of speed-ups over eager, per op group)", ""]
    out.append(_md_table(["group", "cases"] + [c for c in conts if c != EAGER], summary(rows, conts)))
    for ch in charts:
        out += ["", f"![{ch}]({ch})"]
    for g in dict.fromkeys(r.group for r in rows):
        body = []
        for r in (x for x in rows if x.group == g and x.bound != "overhead"):
            fl = floor_s(r, lim)
            own = next(iter(r.recs.values())).get("copy_bytes_per_s")
            fr = [f for f in (fraction(rec, lim) for rec in r.recs.values()) if f]
            errs = [rec["max_err"] for rec in r.recs.values() if rec.get("max_err") is not None]
            body.append([r.case, r.dtype] + [cell(r.recs.get(c), r.eager) for c in conts]
                        + [(_fmt_t(fl) + (f" @ {own / 1e9:.0f} GB/s" if own else "")) if fl else "-",
                           f"{max(fr):.0%}" if fr else "-",
                           f"{max(errs):.1e}" if errs else "-"])
        if body:
            out += ["", f"## {g}", "", _md_table(["case", "dtype", *conts, "floor", "limit", "rel err"], body)]
    over = [r for r in rows if r.bound == "overhead"]
    if over:
        out += ["", "## Per-call overhead (tiny shapes: Python, dispatch and launch cost)", "",
                _md_table(["case", "dtype", *conts], [[r.case, r.dtype] + [cell(r.recs.get(c), r.eager) for c in conts]
                                                       for r in over])]
    bad = [r for r in meta["records"] if r["status"] != "ok"]
    if bad:
        out += ["", "## Not timed", ""]
        out += [f"- **{r['status']}** {r['contender']} on {r['case']} {r['dtype']}: {r['reason']}" for r in bad]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# terminal and charts
# ---------------------------------------------------------------------------------------------
def print_table(meta: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    rows = rows_of(meta)
    conts = contenders_of(rows)
    t = Table(title="dlkernels bench: median per call, speed-up over torch eager", show_lines=False)
    for col in ["case", "dtype", *conts, "limit"]:
        t.add_column(col, overflow="fold")
    for r in rows:
        fr = [f for f in (fraction(rec, meta["limits"]) for rec in r.recs.values()) if f]
        cells = []
        for c in conts:
            txt = cell(r.recs.get(c), r.eager)
            cells.append(f"[bold red]{txt}[/]" if txt.startswith(("FAILED", "ERROR")) else txt)
        t.add_row(r.case, r.dtype, *cells, f"{max(fr):.0%}" if fr else "-")
    con = Console()
    if not con.is_terminal:  # a log file: no wrapping of case ids into a column of fragments
        con = Console(width=220)
    con.print(t)


def charts(meta: dict, out_dir: Path) -> list[str]:
    """speedup.png (per case and backend, over eager) and limits.png (achieved share of the limit)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows_of(meta) if r.bound != "overhead"]
    conts = contenders_of(rows)
    written = []
    for fname, title, value, others in (
            ("speedup.png", "speed-up over PyTorch eager (log scale; >1 is faster)",
             lambda r, c: (r.eager / _median(r.recs[c])) if r.eager and _median(r.recs[c]) else None,
             [c for c in conts if c != EAGER]),
            ("limits.png", "achieved fraction of the machine's limit (copy GB/s or peak FLOP/s)",
             lambda r, c: fraction(r.recs[c], meta["limits"]), conts)):
        data = defaultdict(dict)
        for r in rows:
            for c in others:
                if c in r.recs:
                    val = value(r, c)
                    if val:
                        data[f"{r.case} {r.dtype}"][c] = val
        if not data:
            continue
        labels = list(data)
        h = 0.8 / max(1, len(others))
        fig, ax = plt.subplots(figsize=(11, 1.2 + 0.32 * len(labels) * max(1, len(others)) ** 0.5))
        for i, c in enumerate(others):
            ys = [j + i * h for j in range(len(labels))]
            ax.barh(ys, [data[lb].get(c, 0) for lb in labels], height=h, label=c)
        ax.set_yticks([j + 0.4 - h / 2 for j in range(len(labels))], labels, fontsize=7)
        ax.invert_yaxis()
        if fname == "speedup.png":
            ax.set_xscale("log")
            ax.axvline(1.0, color="black", lw=0.8)
        else:
            ax.axvline(1.0, color="black", lw=0.8, ls="--")
        m = meta["machine"] or {}
        ax.set_title(f"{title}\n{m.get('device_name')}, {m.get('date')}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


def write(meta: dict, out_dir: Path) -> Path:
    names = charts(meta, out_dir)
    path = out_dir / "report.md"
    path.write_text(markdown(meta, names))
    return path
