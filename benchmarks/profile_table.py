"""Reading a profiler trace back as a table: the time of each compiled op, summed by model part
(encoder, text stack, outside the model), layer kind, forward or backward pass, and matmul or not.

XLA:CPU records one event per executed op, and the compiled HLO names each op's source in the
model (its op_name metadata), so op time can be attributed without instrumenting the model.
Used by train_throughput.py and decode_speed.py (`--profile_dir`).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import jax

BLOCKS = (
    ("Dropout", "dropout (random bits, masks)"),
    ("cross_attention", "cross-attention"),
    ("self_attention", "self-attention"),
    ("/mlp/", "MLP"),
    ("/logits/", "vocabulary projection"),
    ("norm", "layer norms"),
    ("embedding", "embeddings"),
    ("dynamic_update_slice", "scan: stacking per-step values"),
    ("dynamic_slice", "scan: reading per-step values"),
)


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """Compiled op name -> (its source path, whether it is or contains a matmul)."""
    computations_with_dot: set[str] = set()
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
        elif current and re.search(r"\s(dot|convolution)\(", line):
            computations_with_dot.add(current)
    ops = {}
    for line in hlo_text.splitlines():
        found = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not found:
            continue
        name, rest = found.groups()
        path = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        is_dot = bool(re.search(r"\s(dot|convolution)\(", " " + rest.split(", metadata")[0]))
        is_dot = is_dot or bool(calls and calls.group(1) in computations_with_dot)
        ops[name] = (path.group(1) if path else "", is_dot)
    return ops


VOCABULARY_WORK = "over the vocabulary: loss terms, softmax, argmax"


def classify(path: str, is_dot: bool) -> tuple[str, str, str]:
    """(model part, layer kind, pass) of one compiled op, from its source path (the op_name
    of its HLO metadata; a fusion carries its root's)."""
    if not path:
        # Ops XLA made without metadata: the zero-filled buffers scans stack their saved
        # activations in and copies of them; in decoding loops, matrix-vector products.
        block = "no source path: matmuls" if is_dot else "no source path: fills, copies"
        return "unattributed", block, "?"
    if "/encoder" in path:
        part = "encoder"
    elif any(key in path for key in ("/detailer/", "/decoder/", "._refine/", ".logits/")):
        part = "text stack"
    elif "Captioner" in path:
        part = "model, outside both"  # e.g. the baseline's loss terms over the vocabulary
    else:
        part = "outside the model (optimizer, loss sums, search)"
    block = next((b for key, b in BLOCKS if key in path), None)
    if block is None:
        if "while" in path.rsplit("/", 1)[-1]:
            block = "loop control"
        elif part in ("text stack", "model, outside both"):
            block = VOCABULARY_WORK
        elif part.startswith("outside the model"):
            block = "outside the model"
        else:
            block = "other"
    if block in ("self-attention", "cross-attention") and is_dot:
        projection = re.search(r"attention/(query|key|value|out)/", path)
        if not projection:
            block += " scores & weighted sum"
        elif block == "cross-attention":  # keys/values of the image tokens; queries of the text
            kv = projection.group(1) in ("key", "value")
            block += " key/value projections" if kv else " query/out projections"
        else:
            block += " projections"
    elif block in ("self-attention", "cross-attention", "MLP", "vocabulary projection"):
        block += " matmuls" if is_dot else " (not matmuls: softmax, gelu, bias, reshapes)"
    elif block == VOCABULARY_WORK and is_dot:  # the logits matmul fused with a reduction
        block = "vocabulary projection matmuls fused with a reduction"
    direction = "backward" if "transpose(" in path else "forward"
    return part, block, direction


def op_times(trace_dir: Path) -> collections.Counter:
    """Exclusive time (s) of each compiled op in the newest trace under `trace_dir`.

    XLA:CPU records one event per executed op on the thread that ran it; a loop's event
    encloses the events of its body, so each event's time is its duration less that of the
    events nested in it.
    """
    files = sorted(trace_dir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(str(files[-1]))
    times: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            events = []
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op:
                    events.append((event.start_ns, event.start_ns + event.duration_ns, op))
            events.sort(key=lambda e: (e[0], -e[1]))
            stack: list[tuple[float, str]] = []  # (end, op) of the enclosing events
            for begin, finish, op in events:
                while stack and stack[-1][0] <= begin:
                    stack.pop()
                times[op] += (finish - begin) * 1e-9
                if stack:
                    times[stack[-1][1]] -= (finish - begin) * 1e-9
                stack.append((finish, op))
    return times


def profile_ops(
    run: Callable[[], float],
    hlo_text: str,
    folder: Path,
    calls: int,
    top: int = 12,
    flops_per_call: float | None = None,
) -> dict[str, Any]:
    """Traces `run()` (which makes `calls` calls of one compiled function and returns the
    seconds it took) with jax.profiler into `folder`, and sums the time of the function's ops
    (from `hlo_text`, its compiled HLO) by model part, layer kind, pass and matmul or not."""
    folder.mkdir(parents=True, exist_ok=True)
    jax.profiler.start_trace(str(folder))
    wall = run()
    jax.profiler.stop_trace()
    times = op_times(folder)
    total = sum(times.values())
    ops = hlo_ops(hlo_text)
    by = {key: collections.Counter() for key in ("part", "block", "pass", "matmul", "part_block")}
    unknown = 0.0
    for name, seconds in times.items():
        path, is_dot = ops.get(name, ("", False))
        unknown += seconds if name not in ops else 0.0
        part, block, direction = classify(path, is_dot)
        by["part"][part] += seconds
        by["block"][block] += seconds
        by["pass"][direction] += seconds
        by["matmul"]["matmul" if is_dot else "not matmul"] += seconds
        by["part_block"][f"{part}: {block}"] += seconds
    slowest = [
        {
            "op": name,
            "seconds_per_call": seconds / calls,
            "share": seconds / total,
            "matmul": ops.get(name, ("", False))[1],
            "path": re.sub(r"^jit\([^)]*\)/", "", ops.get(name, ("", False))[0]),
        }
        for name, seconds in times.most_common(top)
    ]
    share = lambda counter: {k: v / total for k, v in counter.most_common()}
    matmul_seconds = by["matmul"]["matmul"] / calls
    result = {
        "trace_dir": str(folder),
        "calls": calls,
        "wall_seconds_per_call": wall / calls,
        "op_seconds_per_call": total / calls,
        "op_time_over_wall": total / wall,
        "matmul_op_seconds_per_call": matmul_seconds,
        "op_seconds_not_in_hlo": unknown / calls,
        **{f"share_by_{k}": share(v) for k, v in by.items()},
        "slowest_ops": slowest,
    }
    if flops_per_call:  # analytic FLOPs over the time spent in matmul ops (summed over threads)
        result["analytic_flops_per_matmul_op_second"] = flops_per_call / max(matmul_seconds, 1e-12)
    return result


def print_profile(name: str, profile: dict[str, Any], call: str = "call") -> None:
    print(
        f"\n### Op time of {name} ({profile['calls']} traced {call}s; ops summed over threads: "
        f"{profile['op_seconds_per_call']:.3g} s per {call}, {profile['op_time_over_wall']:.2f}x "
        f"the wall time {profile['wall_seconds_per_call']:.3g} s)\n"
    )
    if "analytic_flops_per_matmul_op_second" in profile:
        print(
            f"Matmul ops take {profile['matmul_op_seconds_per_call']:.3g} op-seconds per {call}: "
            f"{profile['analytic_flops_per_matmul_op_second'] / 1e9:.1f} analytic GFLOP per "
            "matmul op-second (op time summed over threads).\n"
        )
    for key, title, rows in (
        ("share_by_part", "model part", None),
        ("share_by_pass", "pass", None),
        ("share_by_matmul", "op kind", None),
        ("share_by_block", "layer kind (all parts)", None),
        ("share_by_part_block", "part: layer kind (largest)", 15),
    ):
        rows = [[k, 100 * v] for k, v in list(profile[key].items())[:rows]]
        print(common.markdown_table([title, "% of op time"], rows) + "\n")
    rows = [
        [o["op"], "yes" if o["matmul"] else "no", 1e3 * o["seconds_per_call"], o["path"][-90:]]
        for o in profile["slowest_ops"]
    ]
    print(common.markdown_table(["op", "matmul", f"ms per {call}", "source"], rows))
