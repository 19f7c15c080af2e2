"""StarCoder2's 38 special tokens, in id order (ids 0..37).

Embedded here so that training a tokenizer does not need the released `tokenizer.json`.
"""

from __future__ import annotations

STARCODER2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
    "<repo_name>", "<file_sep>", "<issue_start>", "<issue_comment>", "<issue_closed>",
    "<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>",
    "<jupyter_script>", "<empty_output>", "<code_to_intermediate>", "<intermediate_to_code>",
    "<pr>", "<pr_status>", "<pr_is_merged>", "<pr_base>", "<pr_file>", "<pr_base_code>",
    "<pr_diff>", "<pr_diff_hunk>", "<pr_comment>", "<pr_event_id>", "<pr_review>",
    "<pr_review_state>", "<pr_review_comment>", "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>", "<pr_diff_hunk_comment_line>", "<NAME>", "<EMAIL>", "<KEY>",
    "<PASSWORD>",
)

EOD_TOKEN = "<|endoftext|>"

# Short names other modules use (FIM, repository documents) -> token text.
NAMED_SPECIALS: dict[str, str] = {
    "eod": "<|endoftext|>",
    "fim_prefix": "<fim_prefix>",
    "fim_middle": "<fim_middle>",
    "fim_suffix": "<fim_suffix>",
    "fim_pad": "<fim_pad>",
    "repo_name": "<repo_name>",
    "file_sep": "<file_sep>",
}

# The pre-tokenizer as one regex (single digits, then GPT-2's pattern; the whitespace
# lookahead also stops before a digit, as the digit split ran first).
STARCODER2_SPLIT_PATTERN = (
    r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
)
