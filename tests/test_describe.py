"""Describe: DTensor boxes (cached per sharding spec), plain tensors, dtype errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from dist_helpers import PLACEMENTS, dtensor, global_tensor
from launcher import run_ranks

import dist_ckpt as dc
from dist_ckpt import describe as describe_mod


def _boxes_twice(rank, world):
    shapes = {"a": (8, 12), "uneven": (173, 3), "tiny": (2, 5)}
    sd = {f"{name}/{layout}": dtensor(global_tensor(name, shape), world, layout) for name, shape in shapes.items() for layout in PLACEMENTS}
    describe_mod._BOXES.clear()
    first = describe_mod.describe(sd, rank)
    cached = len(describe_mod._BOXES)
    second = describe_mod.describe(sd, rank)  # every box from the cache now
    truth = {}
    for key, t in sd.items():
        (chunk,) = t.__create_chunk_list__()
        truth[key] = (tuple(int(x) for x in chunk.offsets), tuple(int(x) for x in chunk.sizes))
    got = [{d.key[0]: (d.offsets, d.sizes) for d in desc.desc.tensors} for desc in (first, second)]
    locals_match = all(torch.equal(a, b.to_local().reshape(a.shape)) for a, b in zip(second.tensors, sd.values()))
    return got[0] == truth, got[1] == truth, cached, locals_match


def test_dtensor_boxes_are_right_from_the_cache_for_every_layout():
    out = run_ranks(_boxes_twice, 4)
    for rank, (fresh_ok, cached_ok, cached, locals_match) in out.items():
        assert fresh_ok and cached_ok and locals_match, rank
        # one entry per distinct (spec, coordinate): 3 shapes x 5 layouts
        assert cached == 15, (rank, cached)


def test_plain_tensors_do_not_import_dtensor():
    code = "import sys, torch; from dist_ckpt.describe import describe; describe({'a': torch.ones(3)}, 0); print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtype_names_the_key():
    with pytest.raises(dc.StateDictError, match=r"complex32.*model.*w"):
        describe_mod.describe({"model": {"w": torch.zeros(2, dtype=torch.complex32)}}, 0)


def _describe_parameters(rank, world):
    params = {layout: torch.nn.Parameter(dtensor(global_tensor("p", (8, 6)), world, layout)) for layout in ("shard0", "replicate")}
    desc = describe_mod.describe(params, rank)
    return [t.grad_fn is None for t in desc.tensors], torch.is_grad_enabled()


def test_describing_parameters_builds_no_autograd_graph():
    """Describing DTensor parameters takes their local tensors as they are: no autograd node per tensor
    (~100 us each, most of describing an FSDP state), and grad mode is left as the caller had it."""
    out = run_ranks(_describe_parameters, 2)
    for rank, (no_graph, grad_enabled) in out.items():
        assert all(no_graph) and grad_enabled, (rank, no_graph)
