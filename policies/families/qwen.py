"""Qwen (ChatML): <|im_start|>role ... <|im_end|>; no BOS token at all."""

from policies.families import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="qwen",
    system_role=True,
    alternating_roles=False,
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
    add_bos=False,
    # Qwen2.5 instruct generation_config.json.
    temperature=0.7,
    top_p=0.8,
)
