"""Mutation testing of the engine: apply each mutation of mutations.py to a checkout, run the pytest selection
that guards it, record which tests catch it, and restore the file exactly.

    python mutate.py --root=CHECKOUT --out=RESULTS.json [--only=id,id] [--timeout=600] [-- extra pytest args]
    python mutate.py --root=CHECKOUT --out=BASELINE.json --baseline   # each distinct selection once, unmutated
    python mutate.py --table BEFORE.json [AFTER.json]                  # markdown table (before/after columns)
    python mutate.py --root=CHECKOUT --check                           # every mutation applies (old text once)

Results are written after every mutation (merged by id into --out), so partial results survive. Each pytest
run's output is kept in logs/ beside --out. The file under mutation is backed up first and restored in a
`finally`; a backup left by a killed run is restored at the next start.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from mutations import MUTATIONS  # noqa: E402

BACKUPS = os.path.join(tempfile.gettempdir(), "transfer-engine-mutation-backups")  # Outside any checkout.
SUMMARY = re.compile(r"^(FAILED|ERROR) (.+?)(?= - |$)")
COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def selection_args(mutation):
    args = list(mutation["tests"])
    if mutation.get("k"):
        args += ["-k", mutation["k"]]
    return args


def describe_selection(mutation):
    return " ".join(mutation["tests"]) + (f' -k "{mutation["k"]}"' if mutation.get("k") else "")


def run_pytest(root, selection, extra, timeout, log_path):
    """Runs pytest on `selection` in `root`; returns (outcome facts) as a dict."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *selection, *extra]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # No .pyc of a mutated file outlives it.
    started = time.time()
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # Its own group: a timeout ends its children too.
    timed_out = False
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    seconds = time.time() - started
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(command) + "\n\n" + output)
    failed = []
    for line in output.splitlines():
        match = SUMMARY.match(line)
        if match:
            failed.append(match.group(2).strip())
    lines = [line for line in output.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in COUNTS.findall(last)}
    return {"returncode": None if timed_out else process.returncode, "timed_out": timed_out,
            "failed": list(dict.fromkeys(failed)), "counts": counts, "summary": last[-300:],
            "seconds": round(seconds, 1)}


def write_json(path, data):
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(partial, path)


def backup_path(root, relative):
    return os.path.join(BACKUPS, os.path.abspath(root).strip("/").replace("/", "+") + "+" + relative.replace("/", "+"))


def restore_stale_backups(root):
    """A run killed mid-mutation leaves its backup: put the original back."""
    if not os.path.isdir(BACKUPS):
        return
    prefix = os.path.abspath(root).strip("/").replace("/", "+") + "+"
    for name in os.listdir(BACKUPS):
        if name.startswith(prefix):
            relative = name[len(prefix):].replace("+", "/")
            with open(os.path.join(BACKUPS, name), "rb") as f:
                original = f.read()
            with open(os.path.join(root, relative), "wb") as f:
                f.write(original)
            os.remove(os.path.join(BACKUPS, name))
            print(f"restored {relative} from a stale backup", file=sys.stderr)


def mutate_one(root, mutation, extra, timeout, logs):
    path = os.path.join(root, mutation["file"])
    record = {key: mutation[key] for key in ("id", "concern", "what", "file")}
    record["selection"] = describe_selection(mutation)
    with open(path, "rb") as f:
        original = f.read()
    text = original.decode("utf-8")
    occurrences = text.count(mutation["old"])
    if occurrences != 1:
        record.update(outcome="NOT APPLICABLE", caught_by=[], seconds=0.0,
                      note=f"old text occurs {occurrences} times in {mutation['file']}")
        return record
    mutated = text.replace(mutation["old"], mutation["new"]).encode("utf-8")
    os.makedirs(BACKUPS, exist_ok=True)
    backup = backup_path(root, mutation["file"])
    with open(backup, "wb") as f:
        f.write(original)
    try:
        with open(path, "wb") as f:
            f.write(mutated)
        facts = run_pytest(root, selection_args(mutation), extra, timeout,
                           os.path.join(logs, f"{mutation['id']}.log"))
    finally:
        with open(path, "wb") as f:
            f.write(original)
        with open(path, "rb") as f:
            assert f.read() == original, f"{path} was not restored"
        os.remove(backup)
    if facts["timed_out"]:
        outcome = "error"
    elif facts["failed"]:
        outcome = "caught"
    elif facts["returncode"] == 0:
        outcome = "SURVIVED"
    else:
        outcome = "error"  # Nothing collected, usage error, or a failure the summary did not name.
    record.update(outcome=outcome, caught_by=facts["failed"], seconds=facts["seconds"], counts=facts["counts"],
                  returncode=facts["returncode"], timed_out=facts["timed_out"], summary=facts["summary"])
    return record


def load_results(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return []


def merged(existing, record):
    """`existing` results with `record` in place of its id's (in MUTATIONS order)."""
    by_id = {entry["id"]: entry for entry in existing}
    by_id[record["id"]] = record
    order = {m["id"]: i for i, m in enumerate(MUTATIONS)}
    return sorted(by_id.values(), key=lambda entry: order.get(entry["id"], len(order)))


def run_mutations(args, extra):
    chosen = MUTATIONS
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {m["id"] for m in MUTATIONS}
        if unknown:
            sys.exit(f"unknown mutation ids: {', '.join(sorted(unknown))}")
        chosen = [m for m in MUTATIONS if m["id"] in wanted]
    logs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "logs")
    os.makedirs(logs, exist_ok=True)
    results = load_results(args.out)
    started = time.time()
    for index, mutation in enumerate(chosen, 1):
        record = mutate_one(args.root, mutation, extra, args.timeout, logs)
        results = merged(results, record)
        write_json(args.out, results)
        print(f"[{index}/{len(chosen)}] {record['id']}: {record['outcome']} in {record['seconds']:.0f} s"
              + (f" by {', '.join(record['caught_by'])}" if record["caught_by"] else "")
              + (f" ({record.get('note') or record.get('summary')})" if record["outcome"] != "caught" else ""),
              flush=True)
    print(f"total {time.time() - started:.0f} s", flush=True)


def run_baseline(args, extra):
    """Each distinct selection once on the unmutated checkout: every one must pass."""
    logs = os.path.join(os.path.dirname(os.path.abspath(args.out)), "logs")
    os.makedirs(logs, exist_ok=True)
    selections = {}
    for mutation in MUTATIONS:
        if args.only and mutation["id"] not in args.only.split(","):
            continue
        selections.setdefault(describe_selection(mutation), (mutation, []))[1].append(mutation["id"])
    results = []
    started = time.time()
    for index, (described, (mutation, ids)) in enumerate(selections.items(), 1):
        facts = run_pytest(args.root, selection_args(mutation), extra, args.timeout,
                           os.path.join(logs, f"baseline_{index:02d}.log"))
        passed = facts["returncode"] == 0 and not facts["failed"]
        results.append({"selection": described, "mutations": ids, "passed": passed, **facts})
        write_json(args.out, results)
        print(f"[{index}/{len(selections)}] {'ok  ' if passed else 'FAIL'} {facts['seconds']:6.0f} s  {described}  "
              f"({facts['summary']})", flush=True)
    print(f"total {time.time() - started:.0f} s; {sum(not r['passed'] for r in results)} selections failed", flush=True)


def check(args):
    bad = 0
    for mutation in MUTATIONS:
        with open(os.path.join(args.root, mutation["file"]), encoding="utf-8") as f:
            count = f.read().count(mutation["old"])
        if count != 1:
            bad += 1
            print(f"NOT APPLICABLE {mutation['id']}: old text occurs {count} times in {mutation['file']}")
    print(f"{len(MUTATIONS) - bad} of {len(MUTATIONS)} mutations apply")


def short(test_id):
    """tests/test_x.py::test_name[param] -> test_x::test_name[param]."""
    path, _, name = test_id.partition("::")
    return f"{os.path.splitext(os.path.basename(path))[0]}::{name}" if name else test_id


def cell(record, limit=4):
    if record is None:
        return "-"
    if record["outcome"] != "caught":
        return f"**{record['outcome']}**" + (f" ({record['note']})" if record.get("note") else "")
    names = [short(test) for test in record["caught_by"]]
    shown = ", ".join(f"`{name}`" for name in names[:limit])
    return shown + (f" +{len(names) - limit} more" if len(names) > limit else "")


def table(paths):
    columns = [{entry["id"]: entry for entry in load_results(path)} for path in paths]
    what = {m["id"]: m for m in MUTATIONS}
    ids = list(dict.fromkeys([m["id"] for m in MUTATIONS] + [i for c in columns for i in c]))
    heads = ["caught by"] if len(paths) == 1 else ["caught by (before)", "caught by (after)"]
    lines = ["| id | concern | mutation | " + " | ".join(heads) + " |",
             "|---|---|---|" + "---|" * len(heads)]
    for mutation_id in ids:
        records = [column.get(mutation_id) for column in columns]
        if all(record is None for record in records):
            continue
        known = next(record for record in records if record) if mutation_id not in what else what[mutation_id]
        lines.append(f"| {mutation_id} | {known['concern']} | {known['what']} | "
                     + " | ".join(cell(record) for record in records) + " |")
    for path, column in zip(paths, columns):
        outcomes = [entry["outcome"] for entry in column.values()]
        total = sum(entry.get("seconds", 0) for entry in column.values())
        lines.append(f"\n{os.path.basename(path)}: {outcomes.count('caught')} caught, {outcomes.count('SURVIVED')} "
                     f"survived, {len(outcomes) - outcomes.count('caught') - outcomes.count('SURVIVED')} other, "
                     f"of {len(outcomes)}; {total / 60:.1f} min of pytest")
    print("\n".join(lines))


def main():
    argv = sys.argv[1:]
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", help="the checkout to mutate (and run pytest in)")
    parser.add_argument("--out", help="results JSON (merged by mutation id)")
    parser.add_argument("--only", help="comma-separated mutation ids")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    parser.add_argument("--baseline", action="store_true", help="run each distinct selection unmutated")
    parser.add_argument("--check", action="store_true", help="only check that every mutation applies")
    parser.add_argument("--table", nargs="+", metavar="RESULTS", help="print a markdown table of 1 or 2 results files")
    args = parser.parse_args(argv)
    if args.table:
        if len(args.table) > 2:
            parser.error("--table takes one or two results files")
        return table(args.table)
    if not args.root:
        parser.error("--root is required")
    args.root = os.path.abspath(args.root)
    if args.check:
        return check(args)
    if not args.out:
        parser.error("--out is required")
    restore_stale_backups(args.root)
    if args.baseline:
        return run_baseline(args, extra)
    return run_mutations(args, extra)


if __name__ == "__main__":
    main()
