"""bot/core/requests/workflow_file.py: an uploaded workflow made ready to run, and ComfyUI's errors in words."""

from __future__ import annotations

from bot.core.requests.workflow_file import summarise, with_outputs


def test_every_image_output_is_saved_fresh_under_the_run_prefix() -> None:
    workflow = {"8": {"class_type": "VAEDecode", "inputs": {}},
                "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
                "10": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
                "11": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}}
    ready = with_outputs(workflow, "r-abc")
    assert [ready[n]["class_type"] for n in ("9", "10", "11")] == ["SaveImage"] * 3
    assert [ready[n]["inputs"]["filename_prefix"] for n in ("9", "10", "11")] == ["r-abc-9", "r-abc-10", "r-abc-11"]
    assert workflow["11"]["class_type"] == "SaveImageWebsocket"  # the upload itself is left as it was


def test_a_long_fixed_choice_list_is_named_from_the_node_itself() -> None:
    # past 20 choices ComfyUI leaves input_config out: KSampler's 42 samplers come from Noodle's own catalog
    body = {"node_errors": {"3": {"class_type": "KSampler", "errors": [{
        "type": "value_not_in_list", "message": "Value not in list",
        "details": "sampler_name: 'euler_a' not in (list of length 42)",
        "extra_info": {"input_name": "sampler_name", "input_config": None, "received_value": "euler_a"}}]}}}
    text = summarise(body, "graph.json")
    assert "node 3 (KSampler): sampler_name: value not in list: 'euler_a' (closest: euler, " in text
    assert "42 choices in all" in text and "/models" not in text
