"""Gemma: <start_of_turn>user ... <end_of_turn>, the model speaks as "model"; the template
raises on a system message, so the system text goes into the first user turn."""

from policies.families import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="gemma",
    system_role=False,
    alternating_roles=True,
    stop_tokens=("<end_of_turn>", "<eos>"),
    add_bos=True,
    # Google's recommended sampling for Gemma instruct models.
    temperature=1.0,
    top_p=0.95,
)
