"""Writes posttrain/_catalog.json: every peer op of the conformance vectors with
its parameters, inputs (dtype, rank), outputs and differentiable inputs.

    python python/tools/gen_catalog.py            # regenerate
    python python/tools/gen_catalog.py --check    # fail if the file is stale

The vectors (conformance/vectors/) are the contract; the catalog is derived
from them so that `posttrain.ops` names every op and can restore the shapes
of its outputs.
"""
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
VECTORS = ROOT / "conformance" / "vectors"
OUT = ROOT / "python" / "posttrain" / "_catalog.json"
HANDLERS = ROOT / "conformance" / "src" / "ops"
# Every parameter name an op handler reads (`ctx.p_f64("x")`, `ctx.param("x")`, ...):
# the options beyond the vectors' (release behaviours, normalizers) that
# `posttrain.ops` accepts; any other keyword is refused as unknown.
READS = re.compile(r'(?:p_(?:opt_)?(?:f64|str|bool|i64|f64_list)|param|str_list\(ctx,|usize_param\(ctx,)\(?\s*"([A-Za-z_][A-Za-z0-9_]*)"')


def handler_params():
    names = set()
    for path in sorted(HANDLERS.glob("*.rs")):
        names.update(READS.findall(path.read_text()))
    return sorted(names)


def catalog():
    ops = {}
    for path in sorted(VECTORS.glob("*.json")):
        f = json.loads(path.read_text())
        op = ops.setdefault(
            f["op"],
            {"source": "", "params": {}, "inputs": {}, "outputs": [], "output_ranks": {}, "grads": []},
        )
        src = f.get("source")
        if isinstance(src, dict) and not op["source"]:
            op["source"] = " ".join(str(src[k]) for k in ("repo", "commit", "path", "function") if src.get(k))
        for case in f["cases"]:
            for k, v in case.get("params", {}).items():
                seen = op["params"].setdefault(k, [])
                if v not in seen and len(seen) < 8:
                    seen.append(v)
            for k, t in case.get("inputs", {}).items():
                spec = op["inputs"].setdefault(k, {"dtype": t["dtype"], "rank": len(t["shape"])})
                # An input some cases give as ints and others as floats (soft
                # labels) lists both: "i64|f64".
                if t["dtype"] not in spec["dtype"].split("|"):
                    spec["dtype"] += "|" + t["dtype"]
            outs = case.get("outputs")
            names = list(outs) if isinstance(outs, (dict, list)) else []
            for k in names:
                if k not in op["outputs"]:
                    op["outputs"].append(k)
                if isinstance(outs, dict):
                    # The output's rank (0: a scalar), so that shapes come back right.
                    op["output_ranks"].setdefault(k, len(outs[k]["shape"]))
            vjp = case.get("vjp") or {}
            g = vjp.get("grads")
            for k in list(g) if isinstance(g, (dict, list)) else []:
                if k not in op["grads"]:
                    op["grads"].append(k)
    return {"format": "posttrain-catalog/1", "handler_params": handler_params(), "ops": dict(sorted(ops.items()))}


def main():
    text = json.dumps(catalog(), indent=1, sort_keys=False) + "\n"
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT} is stale: run python python/tools/gen_catalog.py")
        print(f"{OUT.name} matches the vectors")
        return
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(json.loads(text)['ops'])} ops)")


if __name__ == "__main__":
    main()
