"""Parameter trees addressed by path: split a tree by a predicate on paths, and join it again.

Params are nested dicts of arrays (unboxed); a param's path is its tuple of keys, e.g.
('layers_0', 'attention', 'query', 'kernel'). Fine-tuning splits the trainable params from the
frozen ones with `partition` (the train step differentiates only the first half), and LoRA
splits adapters from base weights the same way.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

Params = dict[str, Any]
Path = tuple[str, ...]


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
  """{path: leaf} of a nested mapping; anything that is not a mapping is a leaf."""
  flat: dict[Path, Any] = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def unflatten(flat: Mapping[Path, Any]) -> Params:
  tree: Params = {}
  for path, leaf in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return tree


def partition(params: Mapping[str, Any], selected: Callable[[Path], bool]
              ) -> tuple[Params, Params]:
  """(selected, rest): nested dicts of the leaves whose path `selected` accepts, and the others.
  The leaves are the same objects as in `params`; `combine` is the inverse."""
  flat = flatten(params)
  return (unflatten({p: v for p, v in flat.items() if selected(p)}),
          unflatten({p: v for p, v in flat.items() if not selected(p)}))


def combine(first: Mapping[str, Any], second: Mapping[str, Any]) -> Params:
  """One params tree from the two halves of `partition`."""
  flat = flatten(second)
  for path, leaf in flatten(first).items():
    if path in flat:
      raise ValueError(f"param {'/'.join(path)} is in both halves; pass the two halves of "
                       f"params.partition.")
    flat[path] = leaf
  return unflatten(flat)
