"""YAML for params files: duplicate keys are errors, and aliases and size are bounded.

PyYAML's `safe_load` executes no code, but it keeps the *last* of two equal keys without a word
(a typo'd profile then silently trains with other settings), and it shares aliased nodes, so a
few hundred bytes of nested aliases ("billion laughs") expand into billions of values as soon as
anything walks or copies the result. `load` refuses all three, naming the file and line.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_BYTES = 1_000_000  # a params file is a few KB
MAX_ALIASES = 100
MAX_NODES = 100_000  # values after aliases are expanded


class YamlError(ValueError):
    """The text is not acceptable YAML for a params file; the message names the place."""


class _Loader(yaml.SafeLoader):
    def __init__(self, stream):
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise YamlError(f"line {mark.line + 1}: more than {MAX_ALIASES} aliases (*name); refused")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise YamlError(f"line {line}: duplicate key {key!r} (first at line {seen[key]}); "
                                    "a repeated key would silently override the first")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _count(value: Any, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise YamlError(f"more than {MAX_NODES} values once aliases are expanded; refused")
    if isinstance(value, dict):
        for k, v in value.items():
            _count(k, budget)
            _count(v, budget)
    elif isinstance(value, list):
        for v in value:
            _count(v, budget)


def load(text: str) -> Any:
    """Parse params YAML; YamlError (duplicate key, alias bomb, too large) or yaml.YAMLError."""
    if len(text.encode("utf-8", "ignore")) > MAX_BYTES:
        raise YamlError(f"larger than {MAX_BYTES} bytes; refused")
    loader = _Loader(text)
    try:
        value = loader.get_single_data()
    finally:
        loader.dispose()
    _count(value, [MAX_NODES])
    return value
