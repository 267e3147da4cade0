"""`<lora:...>` tags are taken out of the text and returned; closest names for unknown ones."""

from __future__ import annotations

import pytest

from prompts import LoraTag, PromptError, closest_names, extract_lora_tags


def test_tags_are_removed_and_returned_in_order() -> None:
    text, tags = extract_lora_tags("a cat <lora:detail:0.8>, <lora:style:0.8:0.5> on a mat <lora:plain>")
    assert text == "a cat ,  on a mat "
    assert tags == [LoraTag("detail", 0.8, 0.8), LoraTag("style", 0.8, 0.5), LoraTag("plain", 1.0, 1.0)]


def test_two_numbers_are_unet_then_clip() -> None:
    assert extract_lora_tags("<lora:x:0.7:0.2>")[1] == [LoraTag("x", unet_weight=0.7, clip_weight=0.2)]


def test_named_strengths_in_either_order() -> None:
    assert extract_lora_tags("<lora:x:te=0.5:unet=0.8>")[1] == [LoraTag("x", 0.8, 0.5)]
    assert extract_lora_tags("<lora:x:0.9:clip=0.1>")[1] == [LoraTag("x", 0.9, 0.1)]


def test_names_keep_spaces_dots_and_folders() -> None:
    _, tags = extract_lora_tags("<lora: sub/My LoRA v1.5 :-0.5>")
    assert tags == [LoraTag("sub/My LoRA v1.5", -0.5, -0.5)]


def test_text_without_tags_is_unchanged() -> None:
    assert extract_lora_tags("a <b> c <lora> d") == ("a <b> c <lora> d", [])


def test_to_dict_is_what_run_meta_stores() -> None:
    assert LoraTag("x", 0.8, 0.5).to_dict() == {"name": "x", "unet_weight": 0.8, "clip_weight": 0.5}


@pytest.mark.parametrize(
    ("text", "message"),
    [("<lora:>", "no name"), ("<lora::0.5>", "no name"), ("<lora:x:abc>", "not a weight"),
     ("<lora:x:inf>", "not a weight"), ("<lora:x:1:2:3>", "at most two"), ("<lora:x:dyn=4>", "unknown setting")],
)
def test_unreadable_tags_say_how_to_write_them(text: str, message: str) -> None:
    with pytest.raises(PromptError, match=message):
        extract_lora_tags(text)


@pytest.mark.parametrize("text", ["<lora:x:" + "a" * 3000 + ">", "<lora:" + "b" * 3000 + ":1:2:3>",
                                  "<lora:x:unet=" + "9" * 3000 + "x>"])
def test_an_unreadable_tag_of_any_length_is_quoted_short(text: str) -> None:
    with pytest.raises(PromptError) as caught:
        extract_lora_tags(text)
    assert len(str(caught.value)) < 300 and "…" in str(caught.value)


def test_closest_names_for_an_unknown_lora() -> None:
    available = ["add_detail.safetensors", "sub/Detail_Tweaker.safetensors", "pixel-art-xl.safetensors", "x.pt"]
    assert closest_names("detail_tweaker", available)[0] == "sub/Detail_Tweaker.safetensors"
    assert "add_detail.safetensors" in closest_names("add_detial", available)
    assert closest_names("pixelart", available) == ["pixel-art-xl.safetensors"]
    assert closest_names("zzzz", available) == []
    assert closest_names("", available) == []
