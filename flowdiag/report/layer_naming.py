"""How the report names a layer, in every figure and table: written here once.

A layer is named by its module path as the run file records it: `levels.0.steps.3.coupling` in
flowdiag's Glow, `flows.7` in a normflows model, `module_list.4` in FrEIA. That path is what the
diagnoses, `watch` and `export` print, and what `model.get_submodule(name)` finds in the user's own
code; a shorthand such as `L0 K3 coupling` exists only for flowdiag's Glow and would name the same
layer two ways. Where the path does not say what the layer is (a library's `flows.7`), its kind
follows in brackets: `flows.7 [coupling]`.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowdiag.record.store import RunHead

# Not layers: the Monitor's onset when every layer output was finite.
ONSET_PLACES = {"loss": "the loss", "backward": "the backward pass"}


def layer_label(name: str, kind: str) -> str:
    """`name`, with `[kind]` added when its last component does not already say it."""
    if not kind or kind == "other" or kind in name.rsplit(".", 1)[-1].lower():
        return name
    return f"{name} [{kind}]"


def layer_labels(names: Sequence[str], kinds: Sequence[str]) -> list[str]:
    """`layer_label` of each (name, kind)."""
    return [layer_label(name, kind) for name, kind in zip(names, kinds, strict=True)]


def head_layer_labels(head: RunHead) -> list[str]:
    """Every layer of a run, forward order, as the report names it."""
    return layer_labels(head.layer_names, head.layer_kinds)


def named_layer(head: RunHead, name: str) -> str:
    """A layer of the run by its recorded name, as the report names it; a name the run does not list
    (the loss, the backward pass, an empty onset) is returned as it is."""
    if name in head.layer_names:
        return layer_label(name, head.layer_kinds[head.layer_names.index(name)])
    return name


def onset_place(head: RunHead) -> str:
    """Where the run went non-finite, in words: `in levels.1.steps.0.coupling`, `in the backward
    pass`; empty when the file does not say."""
    layer = head.nan_onset_layer
    if not layer:
        return ""
    return f"in {ONSET_PLACES.get(layer) or named_layer(head, layer)}"
