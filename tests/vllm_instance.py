"""Runs one vLLM instance (offline API) for the integration tests.

Prints one JSON line {"outputs": [...]} with the greedy completions of the prompts, then, with
--hold, stays alive (so its netloader servers keep serving) until its stdin closes or SIGTERM.
"""

import argparse
import json
import os
import sys


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--load-format", default="netloader")
    parser.add_argument("--extra", default=None, help="model loader extra config (JSON)")
    parser.add_argument("--prompts", default="[]", help="JSON list of prompts")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--hold", action="store_true")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    kwargs = {}
    if args.extra is not None:
        kwargs["model_loader_extra_config"] = json.loads(args.extra)
    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        tensor_parallel_size=args.tp,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        dtype="float32",
        **kwargs,
    )
    prompts = json.loads(args.prompts)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    # One prompt at a time, like the API tests send them: batch shapes then match everywhere.
    outputs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].text for p in prompts]
    print(json.dumps({"outputs": outputs}), flush=True)
    if args.hold:
        sys.stdin.read()  # returns when the parent closes our stdin (or dies)
    os._exit(0)  # skip slow interpreter teardown of the engine


if __name__ == "__main__":
    main()
