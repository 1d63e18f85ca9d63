"""A markdown table of `l2s speed` reports: python scripts/gpu/speed_table.py FILE.json..."""

import json
import sys

print("| run | device | plain step ms | ours iter ms (fwd / bwd) | reference iter ms "
      "| ours / plain | ref / ours | peak GB plain / ours / ref "
      "| kernels plain / ours (host reads ours) |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    try:
        r = json.load(open(path))
        u, q = r["units"], r["ratios"]
    except (OSError, ValueError, KeyError, TypeError):
        continue  # not a speed report (or a cut one)
    p, o, ref = u["plain_step"], u["ours_iteration"], u["reference_iteration"]

    def gb(x):
        return f"{x['peak_mb'] / 1024:.1f}" if x.get("peak_mb") is not None else "-"

    def ops(x, key):
        return (x.get("ops") or {}).get(key, "-")  # reports before op counting have none

    name = path.rsplit("/", 1)[-1].removesuffix(".json")
    print(f"| {name} ({r['model']}, {r['image_size'][0]} px) | {r['device']} | {p['ms']:.1f} "
          f"| {o['ms']:.1f} ({o['forward_ms']:.1f} / {o['backward_ms']:.1f}) | {ref['ms']:.1f} "
          f"| {q['ours_iteration_vs_plain_step']} | {q['reference_vs_ours_iteration']} "
          f"| {gb(p)} / {gb(o)} / {gb(ref)} "
          f"| {ops(p, 'kernels')} / {ops(o, 'kernels')} ({ops(o, 'host_reads')}) |")
