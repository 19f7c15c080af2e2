"""Sharded builds through the real local slurm (../shared/slurm-local): a two-task job array with
`--shard auto`, then the merge job it triggers, give the single build's portrait and search index
byte for byte. Skipped (not failed) where slurm is not installed or its controller is not up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_sc2.cli import main as cli_main
from megatron_sc2.launch import slurm

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(slurm.unavailable() is not None, reason=f"slurm: {slurm.unavailable()}")


def test_two_shard_slurm_builds_equal_single_builds(tmp_path, starcoder2_tokenizer_path, capsys, monkeypatch):
    from megatron_sc2.data.prep.preprocess import preprocess

    lines = [json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" * (1 + i % 5),
                         "repo_name": f"o/r{i % 4}", "path": f"f{i}.py"}) for i in range(40)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    preprocess(str(tmp_path / "d"), str(starcoder2_tokenizer_path), inputs=[str(tmp_path / "in.jsonl")],
               append_eod=True, progress=False)
    data, tok = str(tmp_path / "d_text_document"), str(starcoder2_tokenizer_path)
    assert cli_main(["portrait", "build", "--data-path", data, "--tokenizer-model", tok, "--output",
                     str(tmp_path / "p1")]) == 0
    assert cli_main(["search", "build", "--data-path", data, "--output", str(tmp_path / "s1"),
                     "--tokenizer-model", tok, "--shard-tokens", "700"]) == 0
    shards = len(json.loads((tmp_path / "s1" / "search.json").read_text())["shards"])
    assert shards >= 2  # the array has as many tasks as the whole build has shards

    monkeypatch.chdir(REPO)
    for k, v in dict(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false").items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    assert cli_main(["portrait", "build", "--data-path", data, "--tokenizer-model", tok, "--output",
                     str(tmp_path / "p2"), "--submit-shards", "2", "--time", "00:05:00"]) == 0
    portrait_merge = capsys.readouterr().out.strip()
    assert cli_main(["search", "build", "--data-path", data, "--output", str(tmp_path / "s2"), "--tokenizer-model",
                     tok, "--submit-shards", str(shards), "--time", "00:05:00"]) == 0
    search_merge = capsys.readouterr().out.strip()
    assert "--array=0-1" in (tmp_path / "p2" / "slurm" / "portrait-build.sbatch").read_text()
    for job in (portrait_merge, search_merge):
        info = slurm.wait_job(job, timeout=240)
        assert info["JobState"] == "COMPLETED", slurm.job_output(info)

    assert sorted(p.name for p in (tmp_path / "p2" / "shards").iterdir()) == [
        "portrait-00000-of-00002.bloom", "portrait-00001-of-00002.bloom"]
    assert (tmp_path / "p2" / "portrait.bloom").read_bytes() == (tmp_path / "p1" / "portrait.bloom").read_bytes()
    for f in sorted((tmp_path / "s1").glob("*.bin")) + [tmp_path / "s1" / "search.json"]:
        assert (tmp_path / "s2" / f.name).read_bytes() == f.read_bytes(), f.name


def test_slurm_sharded_remove_equals_one_process(tmp_path, starcoder2_tokenizer_path, capsys, monkeypatch):
    """`remove --submit-shards 3`: a three-task array and the merge after it write the
    one-process output byte for byte and print its report; submitted again after one shard's
    report was lost, only that shard is made again."""
    from megatron_sc2.data.prep.preprocess import preprocess

    lines = [json.dumps({"text": f"def g{i}():\n    return {i}\n", "repo_name": f"o/r{i % 5}", "path": f"g{i}.py"})
             for i in range(30)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    preprocess(str(tmp_path / "d"), str(starcoder2_tokenizer_path), inputs=[str(tmp_path / "in.jsonl")],
               append_eod=True, progress=False)
    data = str(tmp_path / "d_text_document")
    (tmp_path / "optout.txt").write_text("o/r1\no/r3\n")
    common = ["remove", "--data-path", data, "--repos", str(tmp_path / "optout.txt"), "--json"]
    assert cli_main([*common, "--output-prefix", str(tmp_path / "one")]) == 0
    one = json.loads(capsys.readouterr().out)

    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = str(tmp_path / "sharded")
    for round_ in range(2):
        assert cli_main([*common, "--output-prefix", out, "--submit-shards", "3", "--time", "00:05:00"]) == 0
        cap = capsys.readouterr()
        array = cap.err.split("submitted array job ")[1].split()[0]
        info = slurm.wait_job(cap.out.strip(), timeout=180)
        log = slurm.job_output(info)
        assert info["JobState"] == "COMPLETED", log
        assert json.loads(log.strip().splitlines()[-1]) == {**one, "output": out}
        for ext in (".bin", ".idx", ".prov"):
            assert Path(out + ext).read_bytes() == (tmp_path / f"one{ext}").read_bytes(), ext
        logs = [(Path(out + ".slurm") / f"remove-build-{array}_{i}.out").read_text() for i in range(3)]
        if round_ == 0:
            assert all("done" in t and "skipped" not in t for t in logs), logs
            Path(out + ".shard-00001-of-00003.json").unlink()  # as if shard 1 had not finished
        else:
            assert "skipped" in logs[0] and "skipped" in logs[2] and "1/3: done" in logs[1], logs
