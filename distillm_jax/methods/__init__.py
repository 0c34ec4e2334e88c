"""Every training method, each one object of the ``Method`` protocol (``base.py``), registered by name.

- ``plain.py``: ``sft`` (CE only), ``kd`` (a divergence on ground truth), ``seqkd`` (on the teacher's
  responses);
- ``sgo.py``: the methods that train on student-generated outputs through ``offpolicy.py``'s feeder:
  ``distillm`` (adaptive φ, replay buffer), ``imitkd``, ``gkd``, ``gkd_onpolicy``, ``onpolicy``;
- ``minillm.py``: MiniLLM's policy gradient on teacher-mixed rollouts;
- ``distillm2.py``: DistiLLM-2's contrastive loss on both models' cached responses.

A new method is one file: a ``Method`` subclass and ``register(...)`` of an instance (its config keys,
checks, settings, loss and batch source come with it). The method and its baselines: docs/method.md.
"""

from __future__ import annotations

import importlib

from ml_collections import ConfigDict

from distillm_jax.methods.base import Method

REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` under its name (a name is registered once)."""
    if not method.name or method.name in REGISTRY:
        raise ValueError(f"a method needs a name of its own, got {method.name!r}")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name`` (``KeyError`` for an unknown one: ``config.check`` refuses it first)."""
    return REGISTRY[name]


def add_defaults(c: ConfigDict) -> ConfigDict:
    """``c`` with every registered method's config keys (``Method.defaults``); two methods may share a
    key of a shared group only with the same default."""
    for method in REGISTRY.values():
        for group, keys in method.defaults().items():
            if group not in c:
                c[group] = ConfigDict()
            for key, value in keys.items():
                if key in c[group] and c[group][key] != value:
                    raise ValueError(f"methods disagree on the default of {group}.{key}")
                c[group][key] = value
    return c


# The package's methods, registered in the order error messages and tables list them.
for _module in ("plain", "sgo", "minillm", "distillm2"):
    importlib.import_module(f"distillm_jax.methods.{_module}")

__all__ = ["REGISTRY", "Method", "add_defaults", "get", "register"]
