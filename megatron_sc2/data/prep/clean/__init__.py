"""Cleaning a code corpus as StarCoder2's data was cleaned, before `preprocess`: exact and near
dedup (MinHash LSH), PII redaction, decontamination against benchmarks, licence, language and
path filters; as N shards on one machine or a slurm job chain (runner.py, slurm_chain.py)."""
