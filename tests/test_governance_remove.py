"""Opt-out removal: exactly the listed repositories' documents go (checked against the
provenance), everything else is byte-identical and in order, megatron-core reads the result,
and the search index rebuilt from it no longer finds the removed code."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.data.indexed import IndexedDataset, write_documents
from megatron_sc2.data.prep.preprocess import preprocess
from megatron_sc2.data.provenance import open_provenance, provenance_path
from megatron_sc2.data.tokenizer import load_tokenizer
from megatron_sc2.governance import search


@pytest.fixture
def dataset(tmp_path, starcoder2_tokenizer_path):
    tok = load_tokenizer(starcoder2_tokenizer_path)
    for r in range(8):
        for k in range(1 + r % 3):
            p = tmp_path / "repos" / f"owner{r % 3}-repo{r}" / f"f{k}.py"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(f"def f{r}_{k}():\n    return {r * 10 + k}  # repo{r} secret_{r}\n")
    preprocess(str(tmp_path / "d"), tok, inputs=[str(tmp_path / "repos")], append_eod=True, progress=False)
    # and JSON lines of one-file documents naming their repository (The Stack's layout)
    with open(tmp_path / "x.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"x = {i}  # secret_j{i}\n", "repo_name": f"js/r{i % 2}", "path": "a.js"}) + "\n")
    preprocess(str(tmp_path / "j"), tok, inputs=[str(tmp_path / "x.jsonl")], append_eod=True, progress=False)
    return tmp_path, tok


def test_remove_exactly_the_listed_repositories(dataset, capsys):
    tmp, tok = dataset
    prefix = str(tmp / "d_text_document")
    ds, prov = IndexedDataset(prefix), open_provenance(prefix)
    repos = tmp / "optout.txt"
    repos.write_text("# owners who opted out\nowner1-repo1\n\nowner2-repo5  \nnobody/else\n")
    assert cli_main(["remove", "--data-path", prefix, "--repos", str(repos), "--output-prefix", str(tmp / "clean"),
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["removed"] == {"owner1-repo1": 1, "owner2-repo5": 1} and report["not_found"] == ["nobody/else"]
    out = IndexedDataset(tmp / "clean")
    out_prov = open_provenance(tmp / "clean", out.num_documents)
    keep = [d for d in range(ds.num_documents) if prov[d].repository not in ("owner1-repo1", "owner2-repo5")]
    assert out.num_documents == len(keep) == ds.num_documents - 2
    for i, d in enumerate(keep):
        assert np.array_equal(out.document(i), ds.document(d))
        assert out_prov.raw(i) == prov.raw(d)
    assert report["tokens_removed"] == ds.num_tokens - out.num_tokens
    # megatron-core reads the result, document for document
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset as MIndexed
    m = MIndexed(str(tmp / "clean"))
    assert len(m) == len(keep) and all(np.array_equal(m[i], out.document(i)) for i in range(len(keep)))
    # rebuilt, the search index no longer finds the removed repositories' code
    before, after = tmp / "s0", tmp / "s1"
    search.build([prefix], before)
    search.build([str(tmp / "clean")], after)
    for marker, gone in ((" secret_1", True), (" secret_5", True), (" secret_2", False)):
        ids = tok.encode(marker)
        assert search.SearchIndex(before).count_ids(ids) > 0
        assert (search.SearchIndex(after).count_ids(ids) == 0) == gone

    # one-file documents: every file of the listed repository goes
    jp = str(tmp / "j_text_document")
    (tmp / "js.txt").write_text("js/r1\n")
    assert cli_main(["remove", "--data-path", jp, "--repos", str(tmp / "js.txt"), "--output-prefix", str(tmp / "jc")]) == 0
    assert [o.repository for o in open_provenance(tmp / "jc")] == ["js/r0"] * 3


def test_remove_needs_provenance_and_a_list(dataset, capsys):
    tmp, _ = dataset
    write_documents(tmp / "meg_text_document", [[1, 2], [3]], dtype=np.uint16)
    (tmp / "r.txt").write_text("a\n")

    def one_line_error(argv, needle):
        capsys.readouterr()
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err

    one_line_error(["remove", "--data-path", str(tmp / "meg_text_document"), "--repos", str(tmp / "r.txt"),
                    "--output-prefix", str(tmp / "o")], str(provenance_path(tmp / "meg_text_document")))
    assert not (tmp / "o.bin").exists() and not (tmp / "o.idx").exists()
    one_line_error(["remove", "--data-path", str(tmp / "d_text_document"), "--repos", str(tmp / "missing.txt"),
                    "--output-prefix", str(tmp / "o")], "missing.txt")
    one_line_error(["remove", "--data-path", str(tmp / "d_text_document"), "--repos", str(tmp / "r.txt"),
                    "--output-prefix", str(tmp / "d_text_document")], "--output-prefix")
    assert sorted(p.name for p in tmp.iterdir() if ".tmp-" in p.name) == []


def _files(prefix) -> list[bytes]:
    return [open(f"{prefix}{ext}", "rb").read() for ext in (".bin", ".idx", ".prov")]


def test_sharded_remove_merges_to_the_one_process_output(dataset, capsys):
    """Shards of several counts (more shards than documents included: empty shards) merge into
    the one-process output byte for byte, report included; a finished shard re-run is skipped,
    one made from another list is made again, never appended to."""
    tmp, _ = dataset
    prefix = str(tmp / "d_text_document")
    repos = tmp / "optout.txt"
    repos.write_text("owner1-repo1\nowner2-repo5\nowner0-repo3\nnobody/else\n")
    common = ["remove", "--data-path", prefix, "--repos", str(repos), "--json"]
    assert cli_main([*common, "--output-prefix", str(tmp / "one")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert len(one["removed"]) == 3 and one["documents_out"] == IndexedDataset(prefix).num_documents - 3
    for n in (3, 11):
        out = str(tmp / f"n{n}")
        for i in range(n):
            assert cli_main([*common, "--output-prefix", out, "--shard", f"{i}/{n}"]) == 0
        parts = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sum(p["documents_in"] for p in parts) == one["documents_in"]
        assert (tmp / f"n{n}.shard-00000-of-{n:05d}.json").is_file()
        assert cli_main([*common, "--output-prefix", out, "--merge"]) == 0
        merged = json.loads(capsys.readouterr().out)
        assert merged == {**one, "output": out}
        assert _files(out) == _files(tmp / "one")
    # re-running a finished shard: skipped, its files untouched; the merge again gives the same bytes
    shard1 = tmp / "n3.shard-00001-of-00003.bin"
    stamp = shard1.stat().st_mtime_ns
    assert cli_main([*common, "--output-prefix", str(tmp / "n3"), "--shard", "1/3"]) == 0
    assert "skipped" in capsys.readouterr().err and shard1.stat().st_mtime_ns == stamp
    # made from another list: overwritten (now with nothing removed), and the merge refuses the mix
    (tmp / "none.txt").write_text("nobody/else\n")
    assert cli_main(["remove", "--data-path", prefix, "--repos", str(tmp / "none.txt"), "--output-prefix",
                     str(tmp / "n3"), "--shard", "1/3"]) == 0
    assert "skipped" not in capsys.readouterr().err
    assert IndexedDataset(tmp / "n3.shard-00001-of-00003").num_documents == len(range(8 * 1 // 3, 8 * 2 // 3))
    assert cli_main([*common, "--output-prefix", str(tmp / "n3"), "--merge"]) == 2
    assert "repository list" in capsys.readouterr().err
    assert cli_main([*common, "--output-prefix", str(tmp / "n3"), "--shard", "1/3"]) == 0
    assert cli_main([*common, "--output-prefix", str(tmp / "n3"), "--merge", "--num-shards", "3"]) == 0
    assert _files(tmp / "n3") == _files(tmp / "one")
    # the slurm scripts: an array of N tasks with --shard auto, then the merge
    capsys.readouterr()
    assert cli_main([*common, "--output-prefix", str(tmp / "q"), "--submit-shards", "4", "--dry-run"]) == 0
    array = (tmp / "q.slurm" / "remove-build.sbatch").read_text()
    merge = (tmp / "q.slurm" / "remove-merge.sbatch").read_text()
    assert "--array=0-3" in array and array.rstrip().endswith("--shard auto")
    assert "--merge --num-shards 4" in merge and not (tmp / "q.bin").exists()


def test_sharded_remove_refuses_bad_shards(dataset, capsys, monkeypatch):
    tmp, _ = dataset
    d, j = str(tmp / "d_text_document"), str(tmp / "j_text_document")
    repos = tmp / "optout.txt"
    repos.write_text("owner1-repo1\n")
    out = str(tmp / "o")

    def one_line_error(argv, needle):
        capsys.readouterr()
        assert cli_main(["remove", "--repos", str(repos), "--output-prefix", out, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert not any(Path(out + ext).exists() for ext in (".bin", ".idx", ".prov")), "half-written output"

    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    for spec in ("3/3", "-1/3", "1/0", "a/b"):
        one_line_error(["--data-path", d, f"--shard={spec}"], f"--shard {spec}")
    one_line_error(["--data-path", d, "--shard", "auto"], "SLURM_ARRAY_TASK_ID")
    one_line_error(["--data-path", d, "--shard", "0/2", "--merge"], "--merge")
    one_line_error(["--data-path", d, "--shard", "0/2", "--submit-shards", "2", "--dry-run"], "--submit-shards")
    one_line_error(["--data-path", d, "--submit-shards", "0", "--dry-run"], "--submit-shards must be at least 1")
    one_line_error(["--data-path", d, "--num-shards", "2"], "--num-shards goes with --merge")
    one_line_error(["--data-path", d, "--merge"], "no shards to merge")
    assert cli_main(["remove", "--data-path", d, "--repos", str(repos), "--output-prefix", out, "--shard", "0/2"]) == 0
    one_line_error(["--data-path", d, "--merge"], "o.shard-00001-of-00002.json: missing (1 of 2")
    assert cli_main(["remove", "--data-path", d, "--repos", str(repos), "--output-prefix", out, "--shard", "1/2"]) == 0
    one_line_error(["--data-path", j, "--merge"], "another dataset")
    one_line_error(["--data-path", d, "--merge", "--num-shards", "3"], "o.shard-00000-of-00003.json: missing")
    (tmp / "r2.txt").write_text("owner1-repo1\nowner2-repo2\n")
    capsys.readouterr()
    assert cli_main(["remove", "--data-path", d, "--repos", str(tmp / "r2.txt"), "--output-prefix", out,
                     "--merge"]) == 2
    assert "o.shard-00000-of-00002.json: shard made with another repository list" in capsys.readouterr().err
    # stale shards beside a later run with another count
    assert cli_main(["remove", "--data-path", d, "--repos", str(repos), "--output-prefix", out, "--shard", "0/3"]) == 0
    one_line_error(["--data-path", d, "--merge"], "different shard counts [2, 3]")
    # a shard whose files do not match its report, a corrupt report
    shard = tmp / "o.shard-00001-of-00002"
    saved = Path(f"{shard}.prov").read_bytes()
    Path(f"{shard}.prov").write_bytes(saved[:40])
    one_line_error(["--data-path", d, "--merge", "--num-shards", "2"], "o.shard-00001-of-00002.prov: truncated")
    Path(f"{shard}.prov").write_bytes(saved)
    Path(f"{shard}.json").write_text("{not json")
    one_line_error(["--data-path", d, "--merge", "--num-shards", "2"], "o.shard-00001-of-00002.json: corrupt")
    assert cli_main(["remove", "--data-path", d, "--repos", str(repos), "--output-prefix", out, "--shard", "1/2"]) == 0
    # the dataset changed after the shards were made
    os.utime(f"{d}.idx", ns=(1, 1))
    one_line_error(["--data-path", d, "--merge", "--num-shards", "2"], "as it was before it changed")
    for i in range(2):  # made again (not skipped) from the dataset as it is now, then merged
        assert cli_main(["remove", "--data-path", d, "--repos", str(repos), "--output-prefix", out,
                         "--shard", f"{i}/2"]) == 0
        assert "skipped" not in capsys.readouterr().err
    assert cli_main(["remove", "--data-path", d, "--repos", str(repos), "--output-prefix", out, "--merge",
                     "--num-shards", "2"]) == 0
    assert IndexedDataset(out).num_documents == IndexedDataset(d).num_documents - 1
    assert sorted(p.name for p in tmp.iterdir() if ".tmp-" in p.name) == []
