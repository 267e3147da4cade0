"""Embedding files and references: layouts, both syntaxes, warnings instead of exceptions."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from prompts import EmbeddingLibrary, count_tokens, token_report

from .conftest import G_WIDTH, L_WIDTH


def test_names_list_safetensors_only(library: EmbeddingLibrary) -> None:
    assert library.names() == ["broken", "oldstyle", "sd1style", "sub/concept", "xlstyle"]


def test_each_layout_gives_its_vectors(library: EmbeddingLibrary) -> None:
    assert library.vectors("sd1style", L_WIDTH).shape == (2, L_WIDTH)
    assert library.vectors("oldstyle", L_WIDTH).shape == (3, L_WIDTH)
    assert library.vectors("sub/concept", L_WIDTH).shape == (1, L_WIDTH)
    assert library.vectors("xlstyle", L_WIDTH).shape == (2, L_WIDTH)
    assert library.vectors("xlstyle", G_WIDTH).shape == (2, G_WIDTH)


def test_comfy_reference_counts_one_token_per_vector(library: EmbeddingLibrary) -> None:
    report = token_report("a embedding:oldstyle cat", library)
    assert report.tokens == 1 + 3 + 1
    assert report.embeddings == ["oldstyle"] and report.warnings == []


def test_bare_name_counts_the_same_and_any_case(library: EmbeddingLibrary) -> None:
    assert token_report("a OldStyle, cat", library).tokens == 1 + 3 + 2
    assert token_report("a OldStyle, cat", library).embeddings == ["oldstyle"]
    # part of a longer word is not a reference
    assert token_report("a oldstyles cat", library).embeddings == []


def test_reference_forms(library: EmbeddingLibrary) -> None:
    assert token_report("embedding:sd1style.safetensors", library).tokens == 2
    assert token_report("embedding:concept", library).embeddings == ["sub/concept"]  # found in a subfolder
    assert token_report("embedding:sub/concept", library).tokens == 1
    dotted = token_report("a embedding:sd1style.", library)
    assert dotted.embeddings == ["sd1style"] and dotted.tokens == 1 + 2 + 1  # the "." stays as text
    assert token_report("(embedding:sd1style:1.2)", library).embeddings == ["sd1style"]


def test_missing_embedding_is_a_warning_and_left_out(library: EmbeddingLibrary) -> None:
    report = token_report("a embedding:sd1stile cat", library)
    assert report.tokens == 2 and report.embeddings == []
    assert len(report.warnings) == 1 and "sd1stile" in report.warnings[0] and "closest: sd1style" in report.warnings[0]


def test_pickle_embeddings_are_refused_with_a_warning(library: EmbeddingLibrary) -> None:
    comfy = token_report("embedding:evil cat", library)
    assert comfy.tokens == 1 and "pickle" in comfy.warnings[0]
    bare = token_report("evil cat", library)  # the word stays a word
    assert bare.tokens == count_tokens("evil cat") and "pickle" in bare.warnings[0]


def test_unreadable_file_is_a_warning(library: EmbeddingLibrary) -> None:
    report = token_report("embedding:broken", library)
    assert report.tokens == 0 and "could not be read" in report.warnings[0]


def test_file_without_embedding_tensors_is_a_warning(tmp_path: Path) -> None:
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, tmp_path / "odd.safetensors")
    report = token_report("embedding:odd", EmbeddingLibrary(tmp_path))
    assert report.tokens == 0 and "no embedding tensor" in report.warnings[0]


def test_width_is_checked_against_the_encoders(library: EmbeddingLibrary) -> None:
    matches, _ = library.match("embedding:sd1style", widths=[L_WIDTH, G_WIDTH])
    assert matches[0].name is None and "width" in (matches[0].warning or "")
    matches, _ = library.match("embedding:xlstyle", widths=[L_WIDTH, G_WIDTH])
    assert matches[0].name == "xlstyle" and matches[0].vectors == 2


def test_missing_folder_only_warns(tmp_path: Path) -> None:
    report = token_report("embedding:x cat", EmbeddingLibrary(tmp_path / "nowhere"))
    assert report.tokens == 1 and report.warnings


def test_new_files_are_seen_and_change_the_fingerprint(embedding_folder: Path, library: EmbeddingLibrary) -> None:
    before = library.fingerprint()
    assert token_report("embedding:fresh", library).warnings
    save_file({"emb_params": torch.randn(4, L_WIDTH)}, embedding_folder / "fresh.safetensors")
    assert token_report("embedding:fresh", library).tokens == 4
    assert library.fingerprint() != before


def test_a_word_the_case_blind_name_pattern_takes_for_a_name_is_plain_text(library: EmbeddingLibrary) -> None:
    """'ſ' (long s) matches 's' without case: 'eaſy' looked like a name, and the member was told of a pickle file
    that is not there."""
    report = token_report("a ſd1style cat", library)
    assert report.embeddings == [] and report.warnings == []
    assert report.tokens == count_tokens("a ſd1style cat")  # read as the words it is


def test_a_file_overwritten_in_place_is_read_again(embedding_folder: Path, library: EmbeddingLibrary) -> None:
    assert token_report("embedding:sd1style", library).tokens == 2
    before = library.fingerprint()
    folder_mtime = embedding_folder.stat().st_mtime_ns
    replacement = embedding_folder.parent / "new.safetensors"
    save_file({"emb_params": torch.ones(5, L_WIDTH)}, replacement)
    # what `cp new.safetensors embeddings/sd1style.safetensors` does: the folder's mtime stays
    with open(embedding_folder / "sd1style.safetensors", "r+b") as file:
        file.write(replacement.read_bytes())
        file.truncate()
    assert embedding_folder.stat().st_mtime_ns == folder_mtime
    assert token_report("embedding:sd1style", library).tokens == 5
    assert library.fingerprint() != before
    assert torch.equal(library.vectors("sd1style", L_WIDTH), torch.ones(5, L_WIDTH))


def test_a_link_out_of_the_folder_is_not_read(embedding_folder: Path, library: EmbeddingLibrary) -> None:
    outside = embedding_folder.parent / "secret.safetensors"
    save_file({"emb_params": torch.randn(3, L_WIDTH)}, outside)
    (embedding_folder / "link.safetensors").symlink_to(outside)
    (embedding_folder / "inside.safetensors").symlink_to(embedding_folder / "sd1style.safetensors")
    assert "link" not in library.names() and "inside" in library.names()
    report = token_report("embedding:link", library)
    assert report.tokens == 0 and "is not in embeddings/" in report.warnings[0]
