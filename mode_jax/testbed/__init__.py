"""The testbed: a synthetic multimodal task suite and word-level tokenizer for a small model.

`tasks` generates the seeded train/held-out questions, `tokenizer` builds the Kimi-VL-format
tokenizer over their vocabulary and encodes samples.
"""
