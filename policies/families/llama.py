"""Llama 3: <|start_header_id|>role<|end_header_id|> turns ending in <|eot_id|>. The default."""

from policies.families import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="llama",
    system_role=True,
    alternating_roles=False,
    stop_tokens=("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"),
    add_bos=True,
    # Meta's generation_config.json for Llama 3.x instruct models.
    temperature=0.6,
    top_p=0.9,
)
