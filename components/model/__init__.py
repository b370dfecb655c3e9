"""The frozen base: loading a LLaVA checkpoint, building and composing the tiny one, tokenizers."""
