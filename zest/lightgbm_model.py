"""The LightGBM model string of a predictor file, checked completely before LightGBM reads it.

LightGBM reads its text format without bounds checks: a truncated or edited model string can
crash the process (SIGSEGV, SIGABRT) instead of raising. :func:`check_lightgbm_model` reads the
whole string as LightGBM would (header keys, tree sizes against their byte offsets, every array's
length and type, split features in range, child links forming one tree), so that a damaged
predictor file is one line (``ZestRanker.load``, ARCHITECTURE.md §2), never a crash.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: Header keys a LightGBM (v4) model string may hold, and the keys of each of its trees.
_LIGHTGBM_HEADER = frozenset({"version", "num_class", "num_tree_per_iteration", "label_index",
                              "max_feature_idx", "objective", "feature_names", "feature_infos",
                              "tree_sizes", "monotone_constraints"})
_NODE_ARRAYS = ("split_feature", "split_gain", "threshold", "decision_type", "left_child",
                "right_child", "internal_value", "internal_weight", "internal_count")
_LEAF_ARRAYS = ("leaf_value", "leaf_weight", "leaf_count")
_TREE_KEYS = frozenset({"num_leaves", "num_cat", "is_linear", "shrinkage", *_NODE_ARRAYS,
                        *_LEAF_ARRAYS})
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")


def check_lightgbm_model(text: Any, n_features: int) -> list[str]:
    """Checks a LightGBM (v4 text format) model string completely, as LightGBM would read it,
    so that nothing it could read out of bounds or loop on reaches it (a truncated or edited
    model string makes LightGBM crash the process: issue 30).

    The header (one class, lambdarank, ``n_features`` feature names and infos, tree sizes);
    every tree at the offset its ``tree_sizes`` entry gives, with numeric arrays of the lengths
    its leaf count implies, split features in range, no categorical or linear trees, and child
    links that form one tree over every node; then ``end of trees``, the parameters and the
    ``pandas_categorical`` line.

    Returns:
        The feature names the model string declares.

    Raises:
        ValueError: Naming the first fault.
    """
    if not isinstance(text, str) or not text.startswith("tree\n"):
        raise ValueError("no LightGBM model string")
    start = text.find("\nTree=0\n")
    if start < 0:
        raise ValueError("its LightGBM model has no tree")
    start += 1
    header = {}
    for line in text[len("tree\n"):start].splitlines():
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or key not in _LIGHTGBM_HEADER or key in header:
            raise ValueError(f"its LightGBM model has an unexpected header line {line[:40]!r}")
        header[key] = value
    expected = {"version": "v4", "num_class": "1", "num_tree_per_iteration": "1",
                "label_index": "0", "max_feature_idx": str(n_features - 1)}
    for key, value in expected.items():
        if header.get(key) != value:
            raise ValueError(f"its LightGBM model has {key}={header.get(key)!r}, expected "
                             f"{value!r}")
    if not header.get("objective", "").startswith("lambdarank"):
        raise ValueError("its LightGBM model is not a lambdarank model")
    names = header.get("feature_names", "").split(" ")
    infos = header.get("feature_infos", "").split(" ")
    if len(names) != n_features or len(infos) != n_features or not all(names):
        raise ValueError(f"its LightGBM model declares {len(names)} feature names and "
                         f"{len(infos)} feature infos for {n_features} features")
    if not all(info == "none" or re.fullmatch(r"\[[^\[\]:\s]+:[^\[\]:\s]+\]", info)
               for info in infos):
        raise ValueError("its LightGBM model has malformed feature infos")
    sizes = header.get("tree_sizes", "").split(" ")
    if not all(_INTEGER.fullmatch(size) and int(size) > 0 for size in sizes):
        raise ValueError("its LightGBM model has malformed tree sizes")
    offset = start
    for index, size in enumerate(int(size) for size in sizes):
        block = text[offset:offset + size]
        if len(block) != size or not block.startswith(f"Tree={index}\n") or \
                not block.endswith("\n\n\n"):
            raise ValueError(f"its LightGBM model is truncated or edited (tree {index} does "
                             "not fill the size its header gives)")
        _check_tree(block, index, n_features)
        offset += size
    tail = text[offset:]
    if not tail.startswith("end of trees\n"):
        raise ValueError("its LightGBM model is truncated or edited (no 'end of trees' after "
                         f"its {len(sizes)} trees)")
    parameters = tail.find("\nparameters:\n")
    closing = tail.find("\nend of parameters\n", max(parameters, 0))
    if parameters < 0 or closing < 0 or tail[closing:].split() != [
            "end", "of", "parameters", "pandas_categorical:null"]:
        raise ValueError("its LightGBM model is truncated or edited (its parameters do not "
                         "end with 'end of parameters' and 'pandas_categorical:null')")
    for line in tail[parameters + len("\nparameters:\n"):closing].splitlines():
        if not re.fullmatch(r"\[\w+: [^\n\]]*\]", line):
            raise ValueError(f"its LightGBM model has a malformed parameter line {line[:40]!r}")
    return names


def _check_tree(block: str, index: int, n_features: int) -> None:
    """One tree of :func:`check_lightgbm_model`."""
    by_key: dict[str, str] = {}
    for line in block.rstrip("\n").split("\n")[1:]:
        key, sep, value = line.partition("=")
        if not sep or key not in _TREE_KEYS or key in by_key:
            raise ValueError(f"tree {index} of its LightGBM model has an unexpected line "
                             f"{line[:40]!r}")
        by_key[key] = value

    def array(key: str, count: int, integer: bool = False) -> list[float]:
        text = by_key.get(key)
        if text is None:
            raise ValueError(f"tree {index} of its LightGBM model lacks {key}")
        items = text.split(" ") if text else []
        pattern = _INTEGER if integer else _NUMBER
        if len(items) != count or not all(pattern.fullmatch(item) for item in items):
            raise ValueError(f"tree {index} of its LightGBM model has a malformed {key} "
                             f"(expected {count} {'integers' if integer else 'numbers'})")
        values = [int(item) if integer else float(item) for item in items]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"tree {index} of its LightGBM model has non-finite {key}")
        return values

    leaves = array("num_leaves", 1, integer=True)[0]
    if leaves < 1:
        raise ValueError(f"tree {index} of its LightGBM model has {leaves} leaves")
    if array("num_cat", 1, integer=True) != [0] or by_key.get("is_linear", "0") != "0":
        raise ValueError(f"tree {index} of its LightGBM model has categorical or linear "
                         "splits, which zest never trains")
    array("shrinkage", 1)
    array("leaf_value", leaves)
    if leaves == 1:  # a constant tree: LightGBM reads its leaf value only
        return
    for key in _NODE_ARRAYS:
        array(key, leaves - 1, integer=key in ("split_feature", "decision_type", "left_child",
                                                 "right_child", "internal_count"))
    for key in _LEAF_ARRAYS[1:]:
        array(key, leaves, integer=key == "leaf_count")
    split = array("split_feature", leaves - 1, integer=True)
    if min(split) < 0 or max(split) >= n_features:
        raise ValueError(f"tree {index} of its LightGBM model splits on a feature outside "
                         f"0..{n_features - 1}")
    for kind in array("decision_type", leaves - 1, integer=True):
        if not 0 <= kind < 16 or kind & 1 or (kind >> 2) & 3 == 3:
            raise ValueError(f"tree {index} of its LightGBM model has decision type {kind}")
    left = array("left_child", leaves - 1, integer=True)
    right = array("right_child", leaves - 1, integer=True)
    seen_nodes, seen_leaves, stack = {0}, set(), [0]
    while stack:  # every node and leaf reached exactly once from the root: one tree, no cycle
        node = stack.pop()
        for child in (left[node], right[node]):
            if child >= 0:
                if child >= leaves - 1 or child in seen_nodes:
                    raise ValueError(f"tree {index} of its LightGBM model has a broken link")
                seen_nodes.add(child)
                stack.append(child)
            else:
                leaf = ~child
                if leaf >= leaves or leaf in seen_leaves:
                    raise ValueError(f"tree {index} of its LightGBM model has a broken link")
                seen_leaves.add(leaf)
    if len(seen_nodes) != leaves - 1 or len(seen_leaves) != leaves:
        raise ValueError(f"tree {index} of its LightGBM model leaves nodes unreachable")
