"""Templates: params turned into the txt2img graph, with its LoRA chain, which runs."""

from __future__ import annotations

from engine.executor import Executor
from engine.templates import LoraChoice, WorkflowParams, build_workflow


def test_chosen_loras_are_chained_and_run(executor: Executor) -> None:
    graph = build_workflow(WorkflowParams(checkpoint="tiny-sd15.safetensors", prompt="a fox",
                                          loras=(LoraChoice("tiny-lora-a.safetensors", 0.7, 0.7),), steps=2,
                                          width=64, height=64))
    assert graph["lora1"]["inputs"]["lora_name"] == "tiny-lora-a.safetensors"
    assert graph["3"]["inputs"]["model"] == ["lora1", 0]
    result = executor.run(graph)
    assert result.meta["models"]["loras"]["tiny-lora-a.safetensors"]["strength_model"] == 0.7
