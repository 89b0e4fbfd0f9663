"""Llama-2's tokenizer, rebuilt for tests from the Llama SPM vocabulary that llama.cpp ships.

llama-cpp-python's source distribution (a test asset fetched by ``scripts/fetch_test_assets.sh``, run by
``scripts/test.sh``; pip downloads it, nothing is built) carries ``ggml-vocab-llama-spm.gguf``: Llama's 32,000 pieces,
scores and piece types, with llama.cpp's own tokenizer expectations (``.inp``/``.out``). Written into a sentencepiece
``ModelProto`` with Llama-2's normalizer (no NFKC, dummy prefix, spaces kept) and trainer flags (BPE, byte fallback,
unk/bos/eos 0/1/2), it tokenizes as llama.cpp's expectations for Meta's ``tokenizer.model`` say
(``tests/data/test_llama2_tokenizer.py`` checks all of them). Without network the asset is absent and the tests
that need it skip, naming the command.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("HARPE_TEST_ASSETS", ROOT / ".venv" / "test-assets"))
VERSION = "0.3.36"  # llama-cpp-python's; scripts/fetch_test_assets.sh reads it (and ASSETS, SDIST) from here
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
VOCAB = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
SEPARATOR = "\n__ggml_vocab_test__\n"
FETCH_HINT = "run scripts/fetch_test_assets.sh (needs network once) to fetch llama-cpp-python's sdist"


def sdist_path() -> Path:
    return ASSETS / SDIST


def _extract(out_dir: Path) -> Path:
    """The .gguf with its .inp/.out beside it, under ``out_dir``."""
    with tarfile.open(sdist_path()) as tar:
        for suffix in ("", ".inp", ".out"):
            member = tar.getmember(VOCAB + suffix)
            with tar.extractfile(member) as src:
                (out_dir / Path(VOCAB + suffix).name).write_bytes(src.read())
    return out_dir / Path(VOCAB).name


def build_llama2_tokenizer_model(out_dir: Path) -> tuple[Path, list[tuple[str, list[int]]]]:
    """Write ``out_dir/tokenizer.model``; return it and llama.cpp's (text, ids) expectations (ids without BOS)."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    gguf = _extract(out_dir)
    fields = GGUFReader(str(gguf)).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama", "not a Llama SPM vocabulary"
    proto = spm_pb2.ModelProto()
    # gguf's token types are sentencepiece's piece types (NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, BYTE 6).
    pieces = (fields[f"tokenizer.ggml.{name}"].contents() for name in ("tokens", "scores", "token_type"))
    for piece, score, kind in zip(*pieces, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(proto.pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    model = out_dir / "tokenizer.model"
    model.write_bytes(proto.SerializeToString())
    # .inp: texts, each followed by the separator; .out: one line of ids per text.
    texts = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8").split(SEPARATOR)[:-1]
    ids = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").splitlines()
    return model, [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=True)]
