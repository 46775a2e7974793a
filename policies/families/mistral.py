"""Mistral: <s>[INST] user [/INST] answer</s>; older templates refuse system messages and
any two turns of one role in a row."""

from policies.families import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="mistral",
    system_role=False,
    alternating_roles=True,
    stop_tokens=("</s>",),
    add_bos=True,
    # Mistral's recommendation for its instruct models.
    temperature=0.7,
    top_p=1.0,
)
