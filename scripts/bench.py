"""Benchmark ``batchpipe build`` / ``batchpipe merge`` against a naive pandas baseline.

    python scripts/bench.py            # full run: 200k and 1M text rows, 100k/400k RSS check, 5k images
    python scripts/bench.py --quick    # smoke run: 20k/50k text rows, 1k images

Inputs are generated under ``var/bench`` (or ``--work-dir``). Every timed step runs in its own
subprocess; its wall time and peak RSS (``os.wait4`` rusage of that one child) are reported. The fake
Batch API result files for the merge step are generated once, outside the timed part.

Not part of the test suite. Always exits 0; a missed goal is marked MISSED in the output.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-4o-mini"
ENDPOINT = "/v1/chat/completions"
N_IMAGES = 36

WORDS = (
    "the quick brown fox jumps over a lazy dog while résumé café naïve Zürich straße "
    "日本語 テキスト 中文 ✓ 🚀 Ελληνικά кириллица data model batch prompt answer summarise"
).split()


# --------------------------------------------------------------------------- inputs


def make_text_csv(path: Path, n: int, seed: int = 1) -> None:
    """``id, prompt, zip`` rows; prompts have unicode, some commas/quotes/newlines; zip like ``007``."""
    if path.is_file():
        return
    rnd = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "prompt", "zip"])
        for i in range(n):
            words = rnd.choices(WORDS, k=rnd.randint(8, 30))
            if i % 50 == 0:
                words.append('with "quotes", commas\nand a second line')
            w.writerow([f"id-{i:07d}", f"#{i} " + " ".join(words), f"{rnd.randint(0, 999):03d}"])
    tmp.replace(path)


def make_image_csv(folder: Path, n: int, seed: int = 2) -> Path:
    """``n`` rows referencing a few dozen small PNG/JPEG files (relative paths)."""
    from PIL import Image

    path = folder / f"images-{n}.csv"
    if path.is_file():
        return path
    img_dir = folder / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    rnd = random.Random(seed)
    names = []
    for k in range(N_IMAGES):
        size = rnd.choice((48, 64, 96, 128))
        im = Image.new("RGB", (size, size))
        im.putdata([(rnd.randrange(256), rnd.randrange(256), (x * 7) % 256) for x in range(size * size)])
        name = f"img-{k:02d}." + ("png" if k % 2 == 0 else "jpg")
        im.save(img_dir / name)
        names.append(f"img/{name}")
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["id", "prompt", "image"])
        for i in range(n):
            w.writerow([f"img-{i:06d}", f"Describe image #{i} — détails ✓", names[i % N_IMAGES]])
    return path


#: The structured run's schema: an enum, a number, an array and a boolean.
SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number"},
        "topics": {"type": "array", "items": {"type": "string"}},
        "spam": {"type": "boolean"},
    },
    "required": ["sentiment", "score", "topics", "spam"],
    "additionalProperties": False,
}


def text_answer(cid: str, k: int) -> str:
    return f"Answer for {cid}: ça va ✓, line one\nline two"


def schema_answer(cid: str, k: int) -> str:
    """JSON that follows :data:`SCHEMA`; about one answer in 50 does not (a mismatch to report)."""
    answer = {
        "sentiment": ("positive", "negative", "neutral")[k % 3],
        "score": (k % 100) / 100,
        "topics": ["café ✓", f"topic {k % 7}"][: 1 + k % 2],
        "spam": k % 11 == 0,
    }
    if k % 50 == 49:
        answer["score"] = "high"
    return json.dumps(answer, ensure_ascii=False)


def make_results(build_dir: Path, out_dir: Path, seed: int = 3, answer=text_answer) -> list[Path]:
    """One OpenAI-style output file per shard, lines shuffled, answering every custom_id with
    ``answer(custom_id, k)``."""
    manifest = json.loads((build_dir / "build_manifest.json").read_text(encoding="utf-8"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    rnd = random.Random(seed)
    paths = []
    for shard in manifest["shards"]:
        with open(shard["path"], encoding="utf-8") as fh:
            cids = [json.loads(line)["custom_id"] for line in fh]
        rnd.shuffle(cids)
        p = out_dir / f"output-{shard['index']:05d}.jsonl"
        with open(p, "w", encoding="utf-8") as fh:
            for k, cid in enumerate(cids):
                pt, ct = 20 + k % 50, 5 + k % 40
                line = {
                    "id": f"batch_req_{shard['index']}_{k}",
                    "custom_id": cid,
                    "response": {
                        "status_code": 200,
                        "request_id": f"req_{shard['index']}_{k}",
                        "body": {
                            "id": f"chatcmpl-{k}",
                            "object": "chat.completion",
                            "model": MODEL,
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {
                                        "role": "assistant",
                                        "content": answer(cid, k),
                                    },
                                    "finish_reason": "stop",
                                }
                            ],
                            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
                        },
                    },
                    "error": None,
                }
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        paths.append(p)
    rnd.shuffle(paths)
    return paths


# --------------------------------------------------------------------------- naive baseline (child modes)


def naive_build(csv_path: str, out_path: str) -> None:
    import pandas as pd

    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    with open(out_path, "w", encoding="utf-8") as fh:
        for idx, row in df.iterrows():
            req = {
                "custom_id": f"row-{idx}",
                "method": "POST",
                "url": ENDPOINT,
                "body": {"model": MODEL, "messages": [{"role": "user", "content": row["prompt"]}]},
            }
            fh.write(json.dumps(req, ensure_ascii=False, separators=(",", ":")) + "\n")


def naive_merge(csv_path: str, out_csv: str, result_paths: list[str]) -> None:
    import pandas as pd

    results = {}
    for p in result_paths:
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                obj = json.loads(line)
                body = obj["response"]["body"]
                results[obj["custom_id"]] = (
                    body["choices"][0]["message"]["content"],
                    body["usage"]["prompt_tokens"],
                    body["usage"]["completion_tokens"],
                    body["usage"]["total_tokens"],
                )
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    cids = "row-" + df.index.astype(str)
    got = cids.map(lambda c: results.get(c, (None, None, None, None)))
    df["response"] = [g[0] for g in got]
    df["error"] = ["" if g[0] is not None else "no result" for g in got]
    df["prompt_tokens"] = [g[1] for g in got]
    df["completion_tokens"] = [g[2] for g in got]
    df["total_tokens"] = [g[3] for g in got]
    df.to_csv(out_csv, index=False)


# --------------------------------------------------------------------------- runner


TIME = shutil.which("time", path="/usr/bin:/bin")


def run_child(argv: list[str], log: Path) -> tuple[float, float]:
    """Run one child; returns (seconds, peak RSS in MB of that child). Raises on failure.

    The peak RSS is measured by ``/usr/bin/time`` (GNU time, ``%M``) when present: Linux counts the
    RSS a forked child had *before* exec into its ``ru_maxrss``, so forking straight from this (large)
    benchmark process would report the parent's RSS for small children. Without GNU time, falls back to
    ``os.wait4`` rusage of the child (an upper bound).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "include"), env.get("PYTHONPATH", "")])
    env.pop("OPENAI_BATCH_ALLOWED_ROOTS", None)
    rss_file = log.with_suffix(".rss")
    if TIME:
        argv = [TIME, "-f", "%M", "-o", str(rss_file), *argv]
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"child failed ({proc.returncode}): {' '.join(argv)}\n{tail}")
    if TIME:
        return seconds, int(rss_file.read_text().split()[-1]) / 1024  # KiB
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {cores} cores, Python {platform.python_version()} ({platform.platform()}); "
        f"load average now {load}"
    )


class Bench:
    def __init__(self, work: Path):
        self.work = work
        self.rows: list[dict] = []
        self.py = sys.executable

    def run(self, label: str, tool: str, step: str, n: int, argv: list[str]) -> dict:
        log = self.work / "logs" / f"{label}-{tool}-{step}.log".replace("/", "_")
        log.parent.mkdir(parents=True, exist_ok=True)
        seconds, rss = run_child(argv, log)
        rec = {"input": label, "tool": tool, "step": step, "n": n, "seconds": seconds, "rss": rss}
        self.rows.append(rec)
        print(
            f"  {label:<12} {tool:<9} {step:<6} {n / seconds:>12,.0f} rows/s {seconds:8.2f} s {rss:8.1f} MB",
            flush=True,
        )
        return rec

    def project_build(
        self, label: str, csv_path: Path, n: int, extra: list[str] = (), tool: str = "batchpipe"
    ) -> Path:
        out = self.work / "build" / (label if tool == "batchpipe" else f"{label}-{tool}")
        argv = [self.py, "-m", "batchpipe.cli", "build", str(csv_path), "--out-dir", str(out)]
        argv += ["--prompt-column", "prompt", "--model", MODEL, *extra]
        self.run(label, tool, "build", n, argv)
        return out

    def project_merge(
        self, label: str, build_dir: Path, results: list[Path], n: int, extra: list[str] = (),
        tool: str = "batchpipe",
    ) -> None:  # fmt: skip
        out = self.work / "merged" / label / "results.csv"
        argv = [self.py, "-m", "batchpipe.cli", "merge", "--build-dir", str(build_dir)]
        argv += [str(p) for p in results] + ["--out", str(out), *extra]
        self.run(label, tool, "merge", n, argv)

    def naive(self, label: str, csv_path: Path, results: list[Path] | None, n: int) -> None:
        me = str(Path(__file__).resolve())
        out = self.work / "naive" / label
        out.mkdir(parents=True, exist_ok=True)
        self.run(
            label, "naive", "build", n, [self.py, me, "--naive-build", str(csv_path), str(out / "b.jsonl")]
        )
        if results is not None:
            argv = [self.py, me, "--naive-merge", str(csv_path), str(out / "m.csv")]
            self.run(label, "naive", "merge", n, argv + [str(p) for p in results])

    def get(self, label: str, tool: str, step: str) -> dict | None:
        for r in self.rows:
            if (r["input"], r["tool"], r["step"]) == (label, tool, step):
                return r
        return None


def label_of(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--work-dir", default=str(ROOT / "var" / "bench"))
    ap.add_argument("--no-naive-1m", action="store_true", help="skip the naive baseline on the largest input")
    ap.add_argument("--naive-build", nargs=2, metavar=("CSV", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--naive-merge", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.naive_build:
        naive_build(*args.naive_build)
        return 0
    if args.naive_merge:
        naive_merge(args.naive_merge[0], args.naive_merge[1], args.naive_merge[2:])
        return 0

    if args.quick:
        speed_n, big_n, rss_small, rss_big, img_n = 20_000, 50_000, 10_000, 40_000, 1_000
    else:
        speed_n, big_n, rss_small, rss_big, img_n = 200_000, 1_000_000, 100_000, 400_000, 5_000

    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    inputs = work / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    for sub in ("build", "merged", "naive", "results", "cache"):
        shutil.rmtree(work / sub, ignore_errors=True)
    print(f"machine: {machine()}")
    print(f"work dir: {work}")
    t0 = time.perf_counter()
    sizes = sorted({speed_n, big_n, rss_small, rss_big})
    for n in sizes:
        make_text_csv(inputs / f"text-{label_of(n)}.csv", n)
    img_csv = make_image_csv(inputs, img_n)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s\n")

    b = Bench(work)
    print(f"  {'input':<12} {'tool':<9} {'step':<6} {'rows/s':>12}        {'seconds':>8}   {'peak RSS':>8}")
    for n in sizes:
        label = label_of(n)
        csv_path = inputs / f"text-{label}.csv"
        build_dir = b.project_build(label, csv_path, n)
        if n == speed_n:  # every row sent, as the naive script does: the like-for-like build
            b.project_build(label, csv_path, n, ["--no-dedupe"], tool="no-dedupe")
        results = make_results(build_dir, work / "results" / label)  # untimed
        b.project_merge(label, build_dir, results, n)
        if n == speed_n:  # the answer cache: a first run (every lookup misses, every answer kept), a rerun
            cache = ["--cache-dir", str(work / "cache" / label)]
            missed = b.project_build(label, csv_path, n, cache, tool="cache-new")
            b.project_merge(label, missed, results, n, cache, tool="cache-new")
            b.project_build(label, csv_path, n, cache, tool="cache-all")
            shutil.rmtree(work / "cache", ignore_errors=True)
        if not (n == big_n and args.no_naive_1m):
            b.naive(label, csv_path, results, n)
        shutil.rmtree(work / "naive" / label, ignore_errors=True)
        shutil.rmtree(work / "merged" / label, ignore_errors=True)
    # the same rows with a response_schema: every answer parsed, checked and typed
    label = f"{label_of(speed_n)}+schema"
    extra = ["--response-schema", json.dumps(SCHEMA)]
    build_dir = b.project_build(label, inputs / f"text-{label_of(speed_n)}.csv", speed_n, extra)
    results = make_results(build_dir, work / "results" / label, answer=schema_answer)  # untimed
    b.project_merge(label, build_dir, results, speed_n)
    shutil.rmtree(work / "merged" / label, ignore_errors=True)
    b.project_build(f"img-{label_of(img_n)}", img_csv, img_n, ["--image-column", "image"])

    print("\n" + report(b, speed_n, big_n, rss_small, rss_big, img_n))
    return 0


def report(b: Bench, speed_n: int, big_n: int, rss_small: int, rss_big: int, img_n: int) -> str:
    buf = io.StringIO()
    buf.write(f"machine: {machine()}\n")
    how = f"GNU time %M ({TIME})" if TIME else "os.wait4 ru_maxrss (includes the pre-exec fork)"
    buf.write(f"peak RSS per child process: {how}\n\n")
    hdr = f"| {'input':<10} | {'tool':<9} | {'step':<5} | {'rows/s':>10} | {'seconds':>8} | "
    hdr += f"{'peak RSS MB':>11} |"
    buf.write(hdr + "\n|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|\n")
    for r in b.rows:
        buf.write(
            f"| {r['input']:<10} | {r['tool']:<9} | {r['step']:<5} | {r['n'] / r['seconds']:>10,.0f} | "
            f"{r['seconds']:>8.2f} | {r['rss']:>11.1f} |\n"
        )
    buf.write("\n")

    def goal(name: str, value: float | None, ok: bool | None, target: str, fmt: str) -> None:
        shown = "n/a" if value is None else format(value, fmt)
        status = "n/a" if ok is None else ("ok" if ok else "MISSED")
        buf.write(f"| {name:<44} | {shown:>9} | {target:<8} | {status:<6} |\n")

    buf.write(f"| {'goal':<44} | {'value':>9} | {'target':<8} | {'status':<6} |\n")
    buf.write(f"|{'-' * 46}|{'-' * 11}|{'-' * 10}|{'-' * 8}|\n")
    s, lb = label_of(speed_n), label_of(big_n)
    pb, nb = b.get(s, "no-dedupe", "build"), b.get(s, "naive", "build")
    speedup = nb["seconds"] / pb["seconds"] if pb and nb else None
    goal(
        f"build speed-up vs naive at {s} (no dedupe)",
        speedup,
        None if speedup is None else speedup >= 5,
        ">= 5x",
        ".1f",
    )
    db = b.get(s, "batchpipe", "build")
    cost = db["seconds"] / pb["seconds"] if db and pb else None
    goal(f"build time with dedupe / without at {s} (info)", cost, None, "-", ".2f")
    for step, tool, what in (("build", "cache-new", "empty cache"), ("merge", "cache-new", "keeping answers"),
                             ("build", "cache-all", "every row cached")):  # fmt: skip
        plain, cached = b.get(s, "batchpipe", step), b.get(s, tool, step)
        ratio = cached["seconds"] / plain["seconds"] if plain and cached else None
        goal(f"cache, {what}: {step} / no cache (info)", ratio, None, "-", ".2f")
    pm, nm = b.get(s, "batchpipe", "merge"), b.get(s, "naive", "merge")
    mspeed = nm["seconds"] / pm["seconds"] if pm and nm else None
    goal(f"merge speed-up vs naive at {s}", mspeed, None if mspeed is None else mspeed >= 2, ">= 2x", ".1f")
    sm = b.get(f"{s}+schema", "batchpipe", "merge")
    extra = sm["seconds"] / pm["seconds"] - 1 if sm and pm else None
    goal(
        f"structured merge time over plain at {s}",
        None if extra is None else 100 * extra,
        None if extra is None else extra <= 0.30,
        "<= 30 %",
        ".0f",
    )
    ls, lbg = label_of(rss_small), label_of(rss_big)
    for step in ("build", "merge"):
        a, z = b.get(ls, "batchpipe", step), b.get(lbg, "batchpipe", step)
        ratio = z["rss"] / a["rss"] if a and z else None
        goal(
            f"{step} RSS({lbg}) / RSS({ls})",
            ratio,
            None if ratio is None else ratio <= 1.25,
            "<= 1.25",
            ".3f",
        )
    for step in ("build", "merge"):
        a, z = b.get(ls, "naive", step), b.get(lbg, "naive", step)
        ratio = z["rss"] / a["rss"] if a and z else None
        goal(f"naive {step} RSS({lbg}) / RSS({ls}) (info)", ratio, None, "-", ".3f")
    b1, m1 = b.get(lb, "batchpipe", "build"), b.get(lb, "batchpipe", "merge")
    total = b1["seconds"] + m1["seconds"] if b1 and m1 else None
    goal(f"{lb} build + merge seconds", total, None if total is None else total < 60, "< 60 s", ".1f")
    im = b.get(f"img-{label_of(img_n)}", "batchpipe", "build")
    goal(
        f"{label_of(img_n)} image rows/s (build)", im["n"] / im["seconds"] if im else None, None, "-", ",.0f"
    )
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
