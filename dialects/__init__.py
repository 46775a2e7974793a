"""The API dialects clients speak: OpenAI Chat Completions (and legacy Completions and
Embeddings), OpenAI Responses, Anthropic Messages.

Each is a thin, pure translation: a request schema that becomes one
`policies.generation.GenerationRequest`, and a reply that turns the generation's events
(`policies.events`) into that dialect's answer, whole or as a stream of server-sent events.
No dialect generates anything itself: the model servers never see which one was spoken.

Every generation request says what it asks of the model: `needs()` the features the model
must have (else 400, naming the field), `wishes()` the ones used where the model has them
(else left out, with a warning), `ignored()` what the answer leaves out whatever the model
(hosted tools, images in tool results, ...), said in a `Warning` header, and
`constraint_param` the field a constraint that does not compile is blamed on, and
`image_urls()` the images it shows; `to_generation(vision, images)` turns it into the
generation (a Responses request first adds its stored history). `dialects/protocol.py`
declares these as `DialectRequest` and `ChatRequest`, and the ingress has one route body
for every generating route that follows them.

A reply is a `Reply` (`dialects/protocol.py`): `full(events)` for a whole answer, and for a
stream the same four methods in every dialect:
`opening()` before any event, `batch(events)` for each batch of events as they come,
`failure(error)` when the generation fails mid-stream, `closing()` after the Finish.
"""
