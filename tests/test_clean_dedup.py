"""Near and exact dedup of `megatron-sc2 clean` against independent oracles: datasketch's MinHash
(same permutations and hash family: equal signatures), brute-force Jaccard over shingle sets
built here with plain `re.split`, the LSH S-curve, and a 1-shard run for the 4-shard run."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest

from megatron_sc2.data.prep.clean import near_dedup
from megatron_sc2.data.prep.clean.minhash import MinHasher, piece_hashes, shingle_hash_of_bytes, split_words, word_hash
from megatron_sc2.data.prep.clean.runner import merge, run_local, scan_shard
from megatron_sc2.data.prep.clean.settings import CleanConfig


def _shingles(text: str) -> set[str]:
    words = re.split(r"\W", text.lower())
    return {" ".join(words[i:i + 5]) for i in range(len(words) - 4)}


def _jaccard(a: str, b: str) -> float:
    x, y = _shingles(a), _shingles(b)
    return len(x & y) / len(x | y)


def test_signature_equals_datasketch():
    from datasketch import MinHash

    rng = random.Random(0)
    mh = MinHasher()
    texts = ["def f(x):\n    return x + 1\n" * 3, "Ünïcode naïve façade — 例子 x = y + z; print(x)",
             "a  b\t\tc (d) [e] {f} g.h", "short text"]
    texts += ["".join(rng.choice("abc XYZ_01(),.\n\t") for _ in range(rng.randint(0, 400))) for _ in range(20)]
    for t in texts:
        ours = mh.signature(t)
        sh = _shingles(t)
        if not sh:
            assert (ours == np.uint32(0xFFFFFFFF)).all()
            continue
        ref = MinHash(num_perm=250, seed=42, hashfunc=shingle_hash_of_bytes)
        ref.update_batch([s.encode("utf-8") for s in sh])
        assert np.array_equal(ours, ref.hashvalues), t


def test_piece_hashes_equal_the_scalar_definition():
    """The vectorized split and hash against `re.split` and the per-piece loop, ASCII and not
    (letters, digits and separators of other scripts, a lower() that changes the length)."""
    rng = random.Random(1)
    for alphabet in ("aZ_9 ,.\n\t()", "aZ_9 ,éÜß例子٣²—\u00a0İ\u2028𝔘\U0001F600"):
        for _ in range(200):
            t = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            assert piece_hashes(t).tolist() == [word_hash(w) for w in split_words(t)], t


def _vocab(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) + str(i)
            for i in range(n)]


def _base_file(rng: random.Random, vocab: list[str]) -> list[list[str]]:
    """A few functions, each a list of lines of words."""
    funcs = []
    for _ in range(6):
        name = rng.choice(vocab)
        lines = [f"def {name}({rng.choice(vocab)}, {rng.choice(vocab)}):"]
        for _ in range(8):
            lines.append("    " + " = ".join([rng.choice(vocab)] + [" + ".join(rng.sample(vocab, 3))]))
        funcs.append(lines)
    return funcs


def _render(funcs: list[list[str]]) -> str:
    return "\n\n".join("\n".join(f) for f in funcs) + "\n"


def _variant(rng: random.Random, funcs: list[list[str]], vocab: list[str], kind: str, edits: int) -> str:
    funcs = [list(f) for f in funcs]
    if kind == "reorder":
        rng.shuffle(funcs)
    text = _render(funcs)
    if kind == "rename":
        words = sorted(set(re.findall(r"[a-z]+\d+", text)))
        for w in rng.sample(words, min(edits, len(words))):
            text = re.sub(rf"\b{w}\b", w.upper() + "_R", text)
        return text
    words = text.split(" ")
    for _ in range(edits):
        i = rng.randrange(len(words))
        words[i] = rng.choice(vocab) + "x"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Pairs (base, variant) at known Jaccard; bases share no shingles with each other."""
    rng = random.Random(7)
    vocab = _vocab(rng, 20000)
    rows, pairs = [], []
    kinds = [("edit", 1), ("edit", 2), ("edit", 3), ("reorder", 0), ("rename", 1), ("rename", 2),
             ("edit", 40), ("edit", 60), ("edit", 90), ("rename", 25)]
    for p in range(120):
        base = _base_file(rng, vocab)
        kind, edits = kinds[p % len(kinds)]
        a, b = _render(base), _variant(rng, base, vocab, kind, edits)
        pairs.append((len(rows), len(rows) + 1, _jaccard(a, b)))
        rows += [{"repo_name": f"repo{p}a", "path": "m.py", "content": a},
                 {"repo_name": f"repo{p}b", "path": "m.py", "content": b}]
    path = tmp_path_factory.mktemp("planted") / "files.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows, pairs


def _removed(out: Path) -> dict[str, str]:
    """where -> where of the kept copy, for near duplicates."""
    lines = [json.loads(l) for l in (out / "manifest.jsonl").read_text().splitlines()]
    return {e["where"]: e["detail"]["kept"] for e in lines if e["reason"] == "near_duplicate"}


def _where(path: Path, i: int) -> str:
    return f"{path}:{i + 1}"


def test_planted_near_duplicates(planted, tmp_path):
    path, rows, pairs = planted
    cfg = CleanConfig([str(path)], str(tmp_path / "out"), near_dedup=True)
    report = run_local(cfg, 1).report
    removed = _removed(tmp_path / "out")
    high = [(a, b, j) for a, b, j in pairs if j > 0.85]
    low = [(a, b, j) for a, b, j in pairs if j < 0.5]
    assert len(high) >= 50 and len(low) >= 20, (len(high), len(low))
    found = [(_where(path, b) in removed or _where(path, a) in removed) for a, b, _ in high]
    recall = sum(found) / len(high)
    assert recall >= 0.95, recall
    for a, b, j in low:
        assert _where(path, a) not in removed and _where(path, b) not in removed, j
    # brute force: components of pairs at Jaccard >= 0.7 (none lies in 0.5..0.85 here but
    # a few); every removal is the later copy of a brute-force pair, kept = its partner
    bf = {(a, b) for a, b, j in pairs if j >= 0.7}
    for w, kept in removed.items():
        i, k = int(w.rsplit(":", 1)[1]) - 1, int(kept.rsplit(":", 1)[1]) - 1
        assert (min(i, k), max(i, k)) in bf
    # misses, against the S-curve (x the verification's pass rate, ~1 above 0.85)
    misses = len(high) - sum(found)
    p_miss = [1 - float(near_dedup.collision_probability(j)) for _, _, j in high]
    expected = sum(p_miss)
    sd = math.sqrt(sum(p * (1 - p) for p in p_miss))
    assert misses <= expected + 3 * sd + 1, (misses, expected)
    assert report["input"]["files"] == report["output"]["files"] + report["removed_total"]


def test_lsh_without_verification_follows_the_s_curve(planted):
    """verify=0 is BigCode's run: candidate pairs are edges as they come out of the bands."""
    path, rows, pairs = planted
    mh = MinHasher()
    sigs = np.stack([mh.signature(r["content"]) for r in rows])
    edges = {tuple(sorted(e)) for e in near_dedup.candidate_edges(sigs, verify=0.0).tolist()}
    probs = [float(near_dedup.collision_probability(j)) for _, _, j in pairs]
    hits = [(a, b) in edges for a, b, _ in pairs]
    expected, sd = sum(probs), math.sqrt(sum(p * (1 - p) for p in probs))
    assert abs(sum(hits) - expected) <= 4 * sd + 1, (sum(hits), expected)
    pair_set = {(a, b) for a, b, _ in pairs}
    assert edges <= pair_set  # unrelated bases never collide


def test_four_shards_equal_one_shard(planted, tmp_path):
    path, rows, _ = planted
    extra = tmp_path / "dups.jsonl"
    extra.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))  # exact duplicates, other input
    one = CleanConfig([str(path), str(extra)], str(tmp_path / "one"), exact_dedup=True, near_dedup=True)
    four = CleanConfig([str(path), str(extra)], str(tmp_path / "four"), exact_dedup=True, near_dedup=True)
    r1 = run_local(one, 1).report
    for i in (3, 1, 0, 2):
        scan_shard(four, i, 4)
    r4 = merge(four, 4).report
    lines1 = (tmp_path / "one" / "part-00000-of-00001.jsonl").read_text().splitlines()
    parts = sorted((tmp_path / "four").glob("part-*-of-00004.jsonl"))
    assert len(parts) == 4
    lines4 = [l for p in parts for l in p.read_text().splitlines()]
    assert sorted(lines4) == sorted(lines1)
    for p in parts:  # each shard keeps the input order
        mine = p.read_text().splitlines()
        assert mine == [l for l in lines1 if l in set(mine)]
    m1 = (tmp_path / "one" / "manifest.jsonl").read_text()
    assert m1 == (tmp_path / "four" / "manifest.jsonl").read_text()
    for r in (r1, r4):
        r.pop("merge_seconds"), r.pop("output"), r.pop("resources")
    assert r1 == r4
    assert r1["removed"]["exact_dedup"]["exact_duplicate"] == 30


def test_keep_rule_prefers_licence_then_stars(tmp_path):
    text = "def same(a, b):\n    return a + b + the_same_body_everywhere(a, b, c)\n"
    rows = [{"repo_name": "o", "path": "x.py", "content": text, "license_type": "non_permissive", "star_events_count": 900},
            {"repo_name": "n", "path": "x.py", "content": text, "license_type": "no_license", "star_events_count": 5},
            {"repo_name": "p1", "path": "x.py", "content": text, "license_type": "permissive", "star_events_count": 1},
            {"repo_name": "p2", "path": "x.py", "content": text, "license_type": "permissive", "star_events_count": 3}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_local(CleanConfig([str(src)], str(tmp_path / "o"), exact_dedup=True), 1)
    kept = [json.loads(l) for l in (tmp_path / "o" / "part-00000-of-00001.jsonl").read_text().splitlines()]
    assert [r["repo_name"] for r in kept] == ["p2"]


def test_clusters_equal_brute_force_components(tmp_path):
    """Groups of near copies (chains of small edits) and unrelated files: the files removed equal
    the brute-force components at Jaccard >= 0.7 minus one kept per component, up to misses
    bounded by the S-curve; every removal names a file of its own component as the kept one."""
    rng = random.Random(11)
    vocab = _vocab(rng, 20000)
    texts = []
    for g in range(12):
        base = _base_file(rng, vocab)
        text = _render(base)
        for k in range(1 + g % 4):  # groups of 1..4 files, each an edit of the previous
            texts.append(text)
            text = _variant(rng, base, vocab, "edit", 1) if k % 2 == 0 else _variant(rng, base, vocab, "rename", 1)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    n = len(texts)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    pair_j = {}
    for i in range(n):
        for k in range(i + 1, n):
            j = _jaccard(texts[i], texts[k])
            assert j > 0.85 or j < 0.5  # the test's corpus has nothing near the threshold
            if j >= 0.7:
                pair_j[(i, k)] = j
                parent[find(k)] = find(i)
    comps: dict[int, set[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), set()).add(i)
    run_local(CleanConfig([str(src)], str(tmp_path / "o"), near_dedup=True), 1)
    removed = {int(w.rsplit(":", 1)[1]) - 1: int(k.rsplit(":", 1)[1]) - 1 for w, k in _removed(tmp_path / "o").items()}
    for i, k in removed.items():
        assert find(i) == find(k)
    expected_removed = sum(len(c) - 1 for c in comps.values())
    p_miss = [1 - float(near_dedup.collision_probability(j)) for j in pair_j.values()]
    assert expected_removed - len(removed) <= sum(p_miss) + 3 * math.sqrt(sum(p * (1 - p) for p in p_miss)) + 1
    assert len(removed) <= expected_removed


@pytest.mark.parametrize("n_inputs", [2, 6])
def test_shards_equal_one_shard_with_malformed_lines(tmp_path, n_inputs):
    """Fewer input files than shards: each shard reads all and keeps its records; more: each
    shard reads only its own files. Either way the output, manifest and every count equal the
    one-shard run's (malformed lines counted once)."""
    rng = random.Random(n_inputs)
    vocab = _vocab(rng, 5000)
    base = _render(_base_file(rng, vocab))
    inputs = []
    for k in range(n_inputs):
        rows = [json.dumps({"text": base if j % 4 == 0 else _variant(rng, _base_file(rng, vocab), vocab, "edit", 1)})
                for j in range(7)]
        rows.insert(3, '{"text": "broken')
        p = tmp_path / f"in{k}.jsonl"
        p.write_text("\n".join(rows) + "\n")
        inputs.append(str(p))
    kw = dict(exact_dedup=True, near_dedup=True, skip_malformed=True)
    r1 = run_local(CleanConfig(inputs, str(tmp_path / "one"), **kw), 1).report
    four = CleanConfig(inputs, str(tmp_path / "four"), **kw)
    for i in range(4):
        scan_shard(four, i, 4)
    r4 = merge(four, 4).report
    lines = lambda d: sorted(l for p in (tmp_path / d).glob("part-*.jsonl") for l in p.read_text().splitlines())
    assert lines("one") == lines("four")
    assert (tmp_path / "one" / "manifest.jsonl").read_text() == (tmp_path / "four" / "manifest.jsonl").read_text()
    for r in (r1, r4):
        r.pop("merge_seconds"), r.pop("output"), r.pop("resources")
    assert r1 == r4
    assert r1["input"]["malformed_lines"] == n_inputs and r1["input"]["input_files"] == n_inputs
    assert r1["removed"]["exact_dedup"]["exact_duplicate"] == 2 * n_inputs - 1
