"""Tests of train.data: tokenizers, TFDS builder, default corpus, batch pipeline.

Everything runs on tiny corpora written to tmp_path; nothing touches the network.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from train.data import (
    BYTE_SEPARATOR_ID,
    ByteTokenizer,
    CorpusUnavailableError,
    DataConfig,
    build_batches,
    get_tokenizer,
    load_tokens,
    prepare_default_corpus,
    unigram_entropy,
)
from train.data import corpus as corpus_mod
from train.data.textfiles import corpus_layout, split_documents, split_of

WORDS = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
    "by", "this", "are", "from", "or", "an", "at", "which", "function", "module", "object",
    "value", "return", "class", "file", "python", "naïve", "café", "文字", "—", "“quoted”",
]


def _write_corpus(root: Path, n_docs: int, seed: int = 0, min_words: int = 20,
                  max_words: int = 400) -> dict[str, str]:
    """``n_docs`` documents of random words in nested folders; returns relpath -> text."""
    rng = random.Random(seed)
    docs = {}
    for i in range(n_docs):
        n = rng.randint(min_words, max_words)
        text = " ".join(rng.choice(WORDS) for _ in range(n)) + f"\nDocument {i}.\n"
        rel = f"part{i % 3}/doc{i:03d}" + (".md" if i % 5 == 0 else ".rst.txt")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
        docs[rel] = text
    (root / ".hidden.txt").write_text("not a document")
    (root / "image.png").write_bytes(b"\x89PNG")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    """(text_dir, {relpath: text}, cache_dir) shared by the module's tests."""
    base = tmp_path_factory.mktemp("corpus")
    text_dir = base / "text"
    docs = _write_corpus(text_dir, n_docs=60)
    return text_dir, docs, base / "cache"


@pytest.fixture(scope="module")
def cfg(corpus: tuple[Path, dict[str, str], Path]) -> DataConfig:
    text_dir, _, cache = corpus
    return DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(cache),
                      val_fraction=0.1, val_batches=None)


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [next(it) for _ in range(n)]


def _same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x["tokens"], y["tokens"]) and np.array_equal(x["mask"], y["mask"])
        for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 and tok.separator_id == BYTE_SEPARATOR_ID == 0
    text = "Hello, wörld — 文字 ✓\n\ttabs"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 0 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(list(ids)) == text
    assert tok.encode("").shape == (0,)
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)


def test_unknown_tokenizer_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.tokenizer"):
        get_tokenizer(str(tmp_path / "missing.model"))


def test_sentencepiece_tokenizer(corpus, tmp_path: Path) -> None:
    import sentencepiece as spm
    text_dir, docs, _ = corpus
    train_txt = tmp_path / "spm_train.txt"
    train_txt.write_text("\n".join(docs.values()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(train_txt), model_prefix=str(tmp_path / "sp"), vocab_size=80,
        model_type="bpe", character_coverage=1.0, minloglevel=2,
    )
    model = tmp_path / "sp.model"
    tok = get_tokenizer(str(model))
    assert tok.vocab_size == 80
    text = "the function returns a value"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.decode(ids) == text
    cfg = DataConfig(source="text_dir", path=str(text_dir), cache_dir=str(tmp_path / "c"),
                     tokenizer=str(model), val_fraction=0.1)
    batch = next(build_batches(cfg, "train", seq_len=32, batch_size=4, seed=0))
    assert batch["tokens"].shape == (4, 33) and batch["tokens"].dtype == np.int32
    assert batch["tokens"].max() < 80


# --------------------------------------------------------------------------- splits + TFDS


def test_split_is_deterministic_and_disjoint() -> None:
    paths = [f"dir/doc{i}.txt" for i in range(500)]
    parts = split_documents(paths, 0.02)
    assert set(parts["train"]).isdisjoint(parts["validation"])
    assert sorted(parts["train"] + parts["validation"]) == sorted(paths)
    assert 0 < len(parts["validation"]) < 30
    assert parts == split_documents(list(reversed(paths)), 0.02)
    assert all(split_of(p, 0.02) == "validation" for p in parts["validation"])
    # tiny corpora still get one held-out document
    tiny = split_documents(["a.txt", "b.txt"], 0.02)
    assert len(tiny["validation"]) == 1 and len(tiny["train"]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_documents(["only.txt"], 0.02)


def test_tfds_builder_reads_back_documents(corpus, tmp_path: Path) -> None:
    from train.data.tfds_builder import open_text_source, prepare_text_dataset

    text_dir, docs, _ = corpus
    t0 = time.perf_counter()
    builder = prepare_text_dataset(text_dir, tmp_path / "tfds", val_fraction=0.1)
    data_dir = Path(builder.data_dir)
    assert any("array_record" in p.name for p in data_dir.iterdir())
    read = {}
    for split in ("train", "validation"):
        src = open_text_source(dataset_dir=data_dir, split=split)
        read[split] = [src[i] for i in range(len(src))]
        assert len(read[split]) > 0
    assert set(read["train"]).isdisjoint(read["validation"])
    assert sorted(read["train"] + read["validation"]) == sorted(docs.values())
    layout = corpus_layout(text_dir, 0.1)
    assert read["validation"] == [docs[k] for k, _ in layout["validation"]]  # stored order

    # by name, like any other prepared TFDS dataset (e.g. "c4/en")
    name = f"local_text_dataset/{builder.builder_config.name}"
    by_name = open_text_source(name=name, data_dir=tmp_path / "tfds", split="validation")
    assert list(by_name) == read["validation"]
    with pytest.raises(ValueError, match="text_key"):
        open_text_source(dataset_dir=data_dir, split="train", text_key="content")

    # second call only reads metadata
    t1 = time.perf_counter()
    prepare_text_dataset(text_dir, tmp_path / "tfds", val_fraction=0.1)
    assert time.perf_counter() - t1 < max(1.0, (t1 - t0))


def test_tfds_source_by_name(corpus, tmp_path: Path) -> None:
    from train.data.tfds_builder import prepare_text_dataset

    text_dir, _, _ = corpus
    builder = prepare_text_dataset(text_dir, tmp_path / "tfds", val_fraction=0.1)
    name = f"local_text_dataset/{builder.builder_config.name}"
    for streaming in (False, True):
        cfg = DataConfig(source="tfds", name=name, path=str(tmp_path / "tfds"),
                         cache_dir=str(tmp_path / "cache"), streaming=streaming)
        it = build_batches(cfg, "train", seq_len=24, batch_size=3, seed=1)
        batch = next(it)
        assert batch["tokens"].shape == (3, 25) and batch["mask"].shape == (3, 24)
        assert it.info["streaming"] is streaming
    with pytest.raises(ValueError, match="data.name"):
        build_batches(DataConfig(source="tfds", name="no_such_dataset", path=str(tmp_path)),
                      "train", 8, 2)


# --------------------------------------------------------------------------- pipeline


def test_pack_windows_reproduce_stream(cfg: DataConfig) -> None:
    L, B = 31, 4
    for split in ("train", "validation"):
        data = load_tokens(cfg, split)
        stream = np.asarray(data.tokens, dtype=np.int32)
        docs = [t + "\0" for t in _texts(cfg, split)]
        assert np.array_equal(stream, ByteTokenizer().encode("".join(docs)))
        assert int((stream == BYTE_SEPARATOR_ID).sum()) == data.num_documents

    # validation: windows in order; their concatenation is the stream's prefix
    val = list(build_batches(cfg, "validation", L, B))
    rows = np.concatenate([b["tokens"][b["mask"].any(axis=1)] for b in val])
    n = len(stream) // (L + 1)
    assert rows.shape == (n, L + 1)
    assert np.array_equal(rows.reshape(-1), stream[: n * (L + 1)])

    # train: every row of an epoch is a distinct aligned window of the stream
    stream = np.asarray(load_tokens(cfg, "train").tokens, dtype=np.int32)
    windows = stream[: (len(stream) // (L + 1)) * (L + 1)].reshape(-1, L + 1)
    it = build_batches(cfg, "train", L, B, seed=3)
    rows = np.concatenate([b["tokens"] for b in _take(it, it.info["batches_per_epoch"])])
    index = {w.tobytes(): i for i, w in enumerate(windows)}
    ids = [index[r.tobytes()] for r in rows]
    assert len(set(ids)) == len(ids) == it.info["batches_per_epoch"] * B


def _texts(cfg: DataConfig, split: str) -> list[str]:
    layout = corpus_layout(cfg.path, cfg.val_fraction)
    return [p.read_text(encoding="utf-8") for _, p in layout[split]]


@pytest.mark.parametrize("mode", ["pack", "truncate"])
def test_batch_shapes_and_dtypes(cfg: DataConfig, mode: str) -> None:
    L, B = 40, 5
    for split in ("train", "validation"):
        it = build_batches(cfg.replace(mode=mode), split, L, B, seed=0)
        for batch in _take(it, 2) if split == "train" else list(it)[:2]:
            assert set(batch) == {"tokens", "mask"}
            assert batch["tokens"].shape == (B, L + 1) and batch["tokens"].dtype == np.int32
            assert batch["mask"].shape == (B, L) and batch["mask"].dtype == np.float32
            assert batch["tokens"].min() >= 0 and batch["tokens"].max() < 256
            if mode == "pack" and split == "train":
                assert np.all(batch["mask"] == 1.0)


def test_truncate_rows_are_documents(cfg: DataConfig) -> None:
    L = 300
    data = load_tokens(cfg, "validation")
    batches = list(build_batches(cfg.replace(mode="truncate"), "validation", L, 2))
    rows = np.concatenate([b["tokens"] for b in batches])
    masks = np.concatenate([b["mask"] for b in batches])
    for i in range(data.num_documents):
        doc = data.document(i)[: L + 1]
        n = len(doc)
        assert np.array_equal(rows[i, :n], doc)
        assert np.all(rows[i, n:] == 0)
        assert np.all(masks[i, : n - 1] == 1) and np.all(masks[i, n - 1 :] == 0)
    assert np.all(masks[data.num_documents :] == 0)  # padding rows


def test_determinism_and_seeds(cfg: DataConfig) -> None:
    a = _take(build_batches(cfg, "train", 16, 4, seed=0), 6)
    b = _take(build_batches(cfg, "train", 16, 4, seed=0), 6)
    c = _take(build_batches(cfg, "train", 16, 4, seed=1), 6)
    assert _same(a, b)
    assert not _same(a, c)


def test_epochs_reshuffle(cfg: DataConfig) -> None:
    it = build_batches(cfg, "train", 63, 2, seed=0)
    n = it.info["rows"] // 2
    first = np.concatenate([b["tokens"] for b in _take(it, n)])
    second = np.concatenate([b["tokens"] for b in _take(it, n)])
    assert not np.array_equal(first, second)  # new order
    if it.info["rows"] % 2 == 0:  # same windows
        assert sorted(r.tobytes() for r in first) == sorted(r.tobytes() for r in second)


@pytest.mark.parametrize("k", [0, 3, 40])
@pytest.mark.parametrize("streaming", [False, True])
def test_checkpoint_restore(cfg: DataConfig, k: int, streaming: bool) -> None:
    c = cfg.replace(streaming=streaming)
    it = build_batches(c, "train", 20, 3, seed=7)
    _take(it, k)
    state = it.get_state()
    restored_state = json.loads(json.dumps(state))  # JSON-serialisable
    expected = _take(it, 5)
    fresh = build_batches(c, "train", 20, 3, seed=7)
    fresh.set_state(restored_state)
    assert _same(_take(fresh, 5), expected)
    assert fresh.batches_yielded == k + 5

    other = build_batches(c, "train", 20, 3, seed=8)
    with pytest.raises(ValueError, match="different pipeline"):
        other.set_state(restored_state)


def test_validation_fixed(cfg: DataConfig) -> None:
    c = cfg.replace(val_batches=3)
    a = list(build_batches(c, "validation", 16, 4, seed=0))
    b = list(build_batches(c, "validation", 16, 4, seed=123))
    assert len(a) == 3 and _same(a, b)
    assert len(list(build_batches(c, "validation", 16, 4, num_batches=2))) == 2
    everything = list(build_batches(c.replace(val_batches=None), "validation", 16, 4))
    assert _same(everything[:3], a)
    # validation restores too
    it = build_batches(c, "validation", 16, 4)
    next(it)
    state = it.get_state()
    rest = list(it)
    it2 = build_batches(c, "validation", 16, 4)
    it2.set_state(state)
    assert _same(list(it2), rest)


def test_tokens_are_cached(cfg: DataConfig) -> None:
    load_tokens(cfg, "train")
    t0 = time.perf_counter()
    data = load_tokens(cfg, "train")
    it = build_batches(cfg, "train", 16, 4, seed=0)
    next(it)
    assert time.perf_counter() - t0 < 1.0
    assert isinstance(data.tokens, np.memmap)
    assert (data.cache_dir / "train.tokens.npy").is_file()


def test_unigram_entropy() -> None:
    h = unigram_entropy(np.array([0, 1, 2, 3] * 10), 256)
    assert h["bits"] == pytest.approx(2.0) and h["nats"] == pytest.approx(2 * np.log(2))


# --------------------------------------------------------------------------- errors


def test_errors(cfg: DataConfig, tmp_path: Path) -> None:
    n_val = load_tokens(cfg, "validation").num_tokens
    with pytest.raises(ValueError, match="seq_len"):
        build_batches(cfg, "validation", seq_len=n_val, batch_size=1)
    with pytest.raises(ValueError, match="data.path"):
        DataConfig(source="text_dir")
    with pytest.raises(ValueError, match="data.path"):
        build_batches(DataConfig(source="text_dir", path=str(tmp_path / "nope"),
                                 cache_dir=str(tmp_path)), "train", 8, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    with pytest.raises(ValueError, match="no text files"):
        build_batches(DataConfig(source="text_dir", path=str(empty), cache_dir=str(tmp_path)),
                      "train", 8, 2)
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_batches(cfg.replace(tokenizer=str(tmp_path / "missing.model")), "train", 8, 2)
    with pytest.raises(ValueError, match="data.mode"):
        DataConfig(mode="slide")
    with pytest.raises(ValueError, match="unknown data config key"):
        DataConfig.from_dict({"source": "default", "pth": "x"})
    with pytest.raises(ValueError, match="split"):
        build_batches(cfg, "test", 8, 2)


# --------------------------------------------------------------------------- default corpus


def _fake_package(root: Path) -> Path:
    sources = root / "usr/share/doc/python3.11/html/_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "tutorial").mkdir(parents=True)
    (sources / "library/os.rst.txt").write_text("The os module.\n" * 20)
    (sources / "tutorial/intro.rst.txt").write_text("An informal introduction.\n" * 20)
    (sources / "license.rst.txt").write_text("PSF LICENSE AGREEMENT\n")
    (sources / "library/ignored.html").write_text("<html/>")
    copyright_file = root / "usr/share/doc/python3.11-doc/copyright"
    copyright_file.parent.mkdir(parents=True)
    copyright_file.write_text("Python Software Foundation License Version 2\n")
    return root


def test_prepare_default_corpus_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _fake_package(tmp_path / "pkg")
    root = tmp_path / "corpus"
    text_dir = prepare_default_corpus(root, source_tree=pkg)
    assert sorted(p.relative_to(text_dir).as_posix() for p in text_dir.rglob("*")
                  if p.is_file()) == ["library/os.rst.txt", "license.rst.txt",
                                      "tutorial/intro.rst.txt"]
    assert "PSF" in (root / "LICENSE").read_text() or "Python Software" in (
        root / "LICENSE").read_text()
    assert "python3.11-doc" in (root / "README.md").read_text()
    marker = json.loads((root / ".prepared.json").read_text())
    assert marker["documents"] == 3 and marker["license"] == "PSF-2.0"

    # idempotent: the marker short-circuits, even without any source or apt
    shutil.rmtree(pkg)
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda name: None)
    t0 = time.perf_counter()
    assert prepare_default_corpus(root) == text_dir
    assert time.perf_counter() - t0 < 0.1

    # the default source goes through the prepared corpus
    cfg = DataConfig(source="default", cache_dir=str(tmp_path / "cache"))
    target = tmp_path / "cache" / "corpus" / "python3.11-doc"
    shutil.copytree(root, target)
    batch = next(build_batches(cfg, "train", 16, 2, seed=0))
    assert batch["tokens"].shape == (2, 17)


def test_default_corpus_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWRANK_JAX_DOC_DEB", raising=False)
    monkeypatch.setattr(corpus_mod.shutil, "which", lambda name: None)
    with pytest.raises(CorpusUnavailableError) as info:
        prepare_default_corpus(tmp_path / "corpus", use_system=False)
    msg = str(info.value)
    assert "apt-get install python3.11-doc" in msg and "data.path" in msg
    with pytest.raises(CorpusUnavailableError, match="does not exist"):
        prepare_default_corpus(tmp_path / "corpus", deb_path=tmp_path / "missing.deb")


def test_state_survives_moving_the_corpus(cfg: DataConfig, tmp_path: Path) -> None:
    """A checkpoint stays valid on another machine / checkout (paths differ)."""
    it = build_batches(cfg, "train", 20, 3, seed=5)
    _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 3)
    moved = tmp_path / "elsewhere" / Path(cfg.path).name
    shutil.copytree(cfg.path, moved)
    moved_cfg = cfg.replace(path=str(moved), cache_dir=str(tmp_path / "cache2"), val_batches=2)
    fresh = build_batches(moved_cfg, "train", 20, 3, seed=5)
    fresh.set_state(state)
    assert _same(_take(fresh, 3), expected)
