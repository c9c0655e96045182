"""Every conformance vector through the Python path (`posttrain.ops.call`).

The Rust conformance runner checks the core against the peers' own outputs;
this checks that the Python package reaches every op with the peers' names,
passes inputs, parameters and cotangents intact, restores shapes, and
surfaces refusals as ValueError — in f64 and f32, at the files' tolerances.
The cases no correct implementation can pass are those of
conformance/known-vector-defects.txt (the Rust test holds the same list).
"""

import json
import math
import pathlib

import numpy as np
import pytest

import posttrain.ops as ops

ROOT = pathlib.Path(__file__).resolve().parents[2]
VECTORS = ROOT / "conformance" / "vectors"


def _known_defects():
    out = set()
    for line in (ROOT / "conformance" / "known-vector-defects.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        left, backend = line.rsplit("[", 1)
        file, case = (s.strip() for s in left.split("::"))
        out.add((file, case, backend.rstrip("]").strip()))
    return out


DEFECTS = _known_defects()
FILES = sorted(VECTORS.glob("*.json"))


def _num(v):
    if isinstance(v, str):
        return {"nan": math.nan, "NaN": math.nan, "inf": math.inf, "Infinity": math.inf}.get(
            v, -math.inf if v in ("-inf", "-Infinity") else None
        )
    return float(v)


def _array(t):
    data = np.array([_num(v) for v in t["data"]], dtype=np.float64).reshape(t["shape"])
    if t["dtype"] == "bool":
        return data != 0
    if t["dtype"] == "i64":
        return data.astype(np.int64)
    return data


def _names(x):
    return list(x) if isinstance(x, (dict, list)) else []


def _close(got, want, tol):
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    want = np.asarray(want, dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return f"{got.size} values, want {want.size}"
    both_nan = np.isnan(got) & np.isnan(want)
    inf = np.isinf(got) | np.isinf(want)
    with np.errstate(invalid="ignore"):
        ok = both_nan | (inf & (got == want)) | (~inf & (np.abs(got - want) <= tol["abs"] + tol["rel"] * np.abs(want)))
    if ok.all():
        return None
    i = int(np.argmin(ok))
    return f"element {i}: got {got[i]!r}, want {want[i]!r}"


def _run_case(vf, case, precision):
    kwargs = {k: _array(t) for k, t in case.get("inputs", {}).items()}
    kwargs.update(case.get("params", {}))
    vjp = case.get("vjp") or {}
    cots = {k: _array(t) for k, t in (vjp.get("cotangents") or {}).items()}
    grads = _names(vjp.get("grads"))
    return ops.call(vf["op"], cotangents=cots or None, grads=grads if cots else None, dtype=precision, **kwargs)


def _check(path, precision):
    vf = json.loads(path.read_text())
    backend = "core-" + precision
    failures = []
    for case in vf["cases"]:
        if (path.name, case["name"], backend) in DEFECTS:
            continue
        expect = case.get("expect")
        try:
            r = _run_case(vf, case, precision)
        except ValueError as e:
            if expect != "error":
                failures.append(f"{case['name']}: ValueError {e}")
            continue
        if expect == "error":
            failures.append(f"{case['name']}: expected a ValueError, got outputs")
            continue
        if expect in ("finite", "zero"):
            checks = [(n, r.outputs.get(n)) for n in _names(case["outputs"])]
            checks += [(n, r.grads.get(n)) for n in _names((case.get("vjp") or {}).get("grads"))]
            for n, v in checks:
                if v is None:
                    failures.append(f"{case['name']}: `{n}` missing")
                elif expect == "zero" and np.any(np.asarray(v) != 0):
                    failures.append(f"{case['name']}: `{n}` not exactly 0")
                elif expect == "finite" and not np.all(np.isfinite(v)):
                    failures.append(f"{case['name']}: `{n}` not finite")
            continue
        tol = {**vf["tolerance"][precision], **case.get("tolerance", {}).get(precision, {})}
        for n, t in case["outputs"].items():
            if n not in r.outputs:
                failures.append(f"{case['name']}: output `{n}` missing")
                continue
            bad = _close(r.outputs[n], _array(t), tol)
            if bad:
                failures.append(f"{case['name']}: `{n}` {bad}")
        for n, t in ((case.get("vjp") or {}).get("grads") or {}).items():
            if n not in r.grads:
                failures.append(f"{case['name']}: gradient `{n}` missing")
                continue
            if r.grads[n].shape != tuple(t["shape"]):
                failures.append(f"{case['name']}: gradient `{n}` shape {r.grads[n].shape}, want {t['shape']}")
            bad = _close(r.grads[n], _array(t), tol)
            if bad:
                failures.append(f"{case['name']}: d/d`{n}` {bad}")
    return failures


@pytest.mark.parametrize("precision", ["f64", "f32"])
@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_vector_file(path, precision):
    failures = _check(path, precision)
    assert not failures, f"{path.name} [{precision}]: {len(failures)} failing:\n" + "\n".join(failures[:10])


def test_the_vectors_are_there():
    # 151 files of 102 ops when this was written; a copy that lost files fails here.
    assert len(FILES) >= 151
    assert len({json.loads(p.read_text())["op"] for p in FILES}) == len(ops.list_ops())
