"""Each zoo model beside the best export a user can make of the same network without edgeattn, with the same
weights, in one process: the public reference code (and transformers' Swin) exported with plain torch.onnx, on
ort-cpu and openvino-cpu; for NAT, NATTEN's flex backend under torch.compile (natten 0.21 has no ONNX path), in a
process of its own because torch.compile's workers slow whatever runs after them.  natten 0.21 has no relative
position bias, so NAT-Mini (which has one) gets no natten peer; nat-tiny (none) does.

    python benchmarks/bench_peers.py --refs DIR [--models swin-t rmt-t ppma-t nat-tiny nat-mini] [--runs 20]

DIR holds the reference repositories as cloned from GitHub, by their names: ``Swin-Transformer``
(microsoft), ``RMT`` (qhfan), ``PPMA`` (zhongchenzhao).  A missing one makes its rows say so.  The zoo models
use the references' parameter names, so each reference model loads the zoo model's state dict strictly, and
every row's error is measured against the zoo model in eager PyTorch: a peer that computes something else shows.

The reference code imports ``DropPath``, ``to_2tuple``, ``trunc_normal_``, ``register_model`` and ``_cfg`` from
timm (and RMT ``fvcore``'s FLOP counter, which it never calls).  timm does not import beside a CPU-only torch
without a matching torchvision, so where it is missing the script supplies those names itself, before the
reference code runs: in eval mode DropPath is the identity, and the other names are not used in a forward pass.

Columns: median ms over --runs after 3 warm-ups, the files of a model timed in turns on each runtime (5 rounds)
so that the machine's drift hits all alike; "x" = the peer's time / edgeattn's on the same runtime (above 1: edgeattn is
faster; a torch row is compared with edgeattn's faster runtime); load s, file MB (with external data), and max abs
error against eager.
"""

import argparse
import importlib.util
import json
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch
from bench_attention import RUNTIMES, json_of_process, load_onnx, median_ms, peak_memory, time_in_turns
from bench_lm_masks import fmt
from torch import nn

from edgeattn import models
from edgeattn.errors import first_line
from edgeattn.registered import export_registered

warnings.filterwarnings("ignore")


# --- the reference code -------------------------------------------------------------------------------------------


def supply_timm():
    """The five timm names (and fvcore's two) the reference files import, where those packages do not import."""
    try:
        import timm.models.layers  # noqa: F401

        return
    except Exception:
        pass

    class DropPath(nn.Identity):  # stochastic depth: the identity at inference
        def __init__(self, *args, **kwargs):
            super().__init__()

    def module(name, **names):
        m = types.ModuleType(name)
        m.__dict__.update(names)
        sys.modules[name] = m

    module("timm")
    module("timm.models")
    module(
        "timm.models.layers",
        DropPath=DropPath,
        trunc_normal_=nn.init.trunc_normal_,
        to_2tuple=lambda x: tuple(x) if isinstance(x, (tuple, list)) else (x, x),
    )
    module("timm.models.registry", register_model=lambda fn: fn)
    module("timm.models.vision_transformer", VisionTransformer=None, _cfg=lambda **kw: kw)
    module("fvcore")
    module("fvcore.nn", FlopCountAnalysis=None, flop_count_table=None)


def reference(refs, repo, file, build):
    """A builder for the reference model defined in ``refs/repo/file``: ``build(module)`` makes it."""

    def make():
        path = Path(refs or "") / repo / file
        if not refs or not path.is_file():
            raise FileNotFoundError(f"no {repo} reference: clone it into --refs (expected {path})")
        supply_timm()
        spec = importlib.util.spec_from_file_location(f"reference_{repo.replace('-', '_')}", path)
        code = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(code)
        return build(code)

    return make


def hf_swin_state(state):
    """The microsoft Swin state dict (the zoo's swin-t keys) under transformers 5's SwinForImageClassification
    keys (the fused qkv split into q/k/v projections); the derived buffers are left out, transformers builds its own."""
    renames = (
        ("patch_embed.proj", "embeddings.patch_embeddings.projection"),
        ("patch_embed.norm", "embeddings.norm"),
        ("layers.", "encoder.layers."),
        ("norm1", "layernorm_before"),
        ("norm2", "layernorm_after"),
        ("attn.relative_position_bias_table", "attention.relative_position_bias.relative_position_bias_table"),
        ("attn.proj", "attention.o_proj"),
    )
    out = {}
    for key, value in state.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if key.startswith(("head.", "norm.")):
            out[{"head": "classifier", "norm": "swin.layernorm"}[key.split(".")[0]] + key[4:]] = value
            continue
        for a, b in renames:
            key = key.replace(a, b)
        if ".attn.qkv." in key:
            for name, part in zip("qkv", value.chunk(3)):
                out["swin." + key.replace("attn.qkv", f"attention.{name}_proj")] = part
        else:
            out["swin." + key] = value
    return out


def hf_swin(zoo):
    from transformers import SwinConfig, SwinForImageClassification

    model = SwinForImageClassification(
        SwinConfig(
            image_size=224, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7, num_labels=1000
        )
    )
    model.load_state_dict(hf_swin_state(zoo.state_dict()), strict=True)
    return Logits(model)


class Logits(nn.Module):
    """transformers' model returning its logits tensor (what the exported file's one output is)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def strict(build):
    """The reference model with the zoo model's weights, loaded strictly (every key, every shape)."""

    def make(zoo):
        model = build()
        model.load_state_dict(zoo.state_dict(), strict=True)
        return model

    return make


def peers(refs):
    """zoo model -> [(peer name, builder(zoo module) -> module to export)]."""
    return {
        "swin-t": [
            (
                "microsoft Swin, torch.onnx",
                strict(
                    reference(
                        refs, "Swin-Transformer", "models/swin_transformer.py", lambda code: code.SwinTransformer()
                    )
                ),
            ),
            ("transformers Swin, torch.onnx", hf_swin),
        ],
        "rmt-t": [
            (
                "qhfan RMT-T, torch.onnx",
                strict(reference(refs, "RMT", "classfication_release/RMT.py", lambda code: code.RMT_T3(None))),
            )
        ],
        "ppma-t": [
            (
                "PPMA-T, torch.onnx",
                strict(reference(refs, "PPMA", "classification/models/PPMA.py", lambda code: code.PPMAViT_T(None))),
            )
        ],
        "nat-tiny": [("natten 0.21 flex", None)],
        "nat-mini": [("natten 0.21 flex", None)],
    }


# --- NAT on natten ------------------------------------------------------------------------------------------------


class OnNatten(nn.Module):
    """One zoo NAT attention layer (B, N, C) computed by natten's NeighborhoodAttention2D with its weights."""

    def __init__(self, attn, side, kernel, dilation):
        super().__init__()
        from natten import NeighborhoodAttention2D

        if attn.relative_bias() is not None:
            raise ValueError("natten 0.21 has no relative position bias (removed in 0.20): no peer for NAT with rpb")
        dim = attn.qkv.in_features
        self.side, self.na = side, NeighborhoodAttention2D(dim, attn.heads, kernel, dilation=dilation)
        self.na.qkv.load_state_dict(attn.qkv.state_dict())
        self.na.proj.load_state_dict(attn.proj.state_dict())

    def forward(self, x):
        B, N, C = x.shape
        return self.na(x.reshape(B, self.side, self.side, C)).reshape(B, N, C)


def nat_on_natten(built):
    """The zoo NAT with every attention layer on natten (the same weights)."""
    cfg, model = built.config, built.module
    dilations = cfg.get("dilations") or [1] * len(cfg["depths"])
    side = cfg["image_size"] // 4
    for level, d, depth in zip(model.levels, dilations, cfg["depths"]):
        per_block = [d] * depth if isinstance(d, int) else list(d)
        for block, dilation in zip(level.blocks, per_block):
            block.attn = OnNatten(block.attn, side, cfg["kernel"], dilation)
        side //= 2
    return model


def natten_rows(name, runs):
    """The zoo NAT on natten's flex backend, compiled with torch.compile and eager (run in a process of its own).
    Eager flex attention on CPU is slow, so it runs at most 3 timed runs."""
    import natten

    natten.allow_flex_compile(True)
    built = models.build(name, seed=0)
    x = built.inputs["image"]
    with torch.inference_mode():
        ref = built.module.eval()(x)
    try:
        model = nat_on_natten(built).eval()
    except ValueError as e:  # a NAT with relative position bias
        return [dict(model=name, row="natten 0.21 flex", runtime="torch", error=str(e))]
    rows = []
    for how, fn, n in (("torch.compile", torch.compile(model), runs), ("eager", model, min(runs, 3))):
        row = dict(model=name, row=f"natten 0.21 flex, {how}", runtime="torch")
        try:
            with peak_memory(row), torch.inference_mode():
                start = time.perf_counter()
                out = fn(x)  # a compiled model compiles on its first call
                row["load_s"] = time.perf_counter() - start
                row["max_abs_err"] = float((out - ref).abs().max())
                row["ms"] = median_ms(lambda: fn(x), n)
        except Exception as e:
            row["error"] = first_line(e)
        rows.append(row)
    return rows


def natten_in_subprocess(name, runs):
    rows = json_of_process(
        [sys.executable, __file__, "--natten-rows", name, "--runs", str(runs)],
        dict(model=name, row="natten 0.21 flex", runtime="torch"),
    )
    return rows if isinstance(rows, list) else [rows]  # a failed process gives one row


# --- the rows -----------------------------------------------------------------------------------------------------


def plain_export(module, x, path):
    """What a user without edgeattn runs: torch.onnx.export with its defaults (the dynamo exporter in torch 2.13),
    and the TorchScript exporter where that fails.  Returns which one wrote the file."""
    try:
        torch.onnx.export(module, (x,), str(path), dynamo=True, optimize=True, verbose=False)
        return "dynamo"
    except Exception as dynamo_error:
        try:
            torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17)
            return "torchscript"
        except Exception as e:
            raise RuntimeError(f"torch.onnx fails: dynamo: {first_line(dynamo_error)}; torchscript: {first_line(e)}")


def file_mb(path):
    """The file and its external data (torch.onnx's dynamo exporter writes weights beside it)."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6


def bench_model(name, refs, runs, tmp):
    built = models.build(name, seed=0)
    zoo, x = built.module.eval(), built.inputs["image"]
    with torch.inference_mode():
        ref = zoo(x)
    rows, timed = [], []  # timed: (row, run function)
    path = Path(tmp) / f"{name}.onnx"
    start = time.perf_counter()
    export_registered(name, path, lowering="auto")
    files = [("edgeattn auto", path, dict(export_s=time.perf_counter() - start))]
    for peer, build in peers(refs).get(name, []):
        if build is None:
            rows += natten_in_subprocess(name, runs)
            continue
        path = Path(tmp) / f"{name}-peer-{len(files)}.onnx"
        try:
            module = build(zoo).eval()
            start = time.perf_counter()
            exporter = plain_export(module, x, path)
        except Exception as e:
            rows.append(dict(model=name, row=peer, runtime="-", error=first_line(e)))
            continue
        files.append((peer, path, dict(exporter=exporter, export_s=time.perf_counter() - start)))
    for label, path, extra in files:
        for runtime in RUNTIMES:
            load_onnx(rows, timed, label, runtime, path, x, ref, model=name, file_mb=file_mb(path), **extra)
    time_in_turns(timed, runs)  # in turns within a runtime: onnxruntime's spinning threads slow OpenVINO after them
    ours = {r["runtime"]: r["ms"] for r in rows if r["row"] == "edgeattn auto" and r.get("ms")}
    for r in rows:  # a torch row is compared with edgeattn's faster runtime
        mine = ours.get(r["runtime"], min(ours.values(), default=None) if r["runtime"] == "torch" else None)
        if r.get("ms") and mine and r["row"] != "edgeattn auto":
            r["x"] = r["ms"] / mine
    return rows


def table(rows):
    lines = ["| model | path | runtime | ms | x | load s | file MB | max err |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['row']} | {r['runtime']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['row']} | {r['runtime']} | {fmt(r.get('ms'), '.2f')} | "
            f"{fmt(r.get('x'), '.2f')} | {fmt(r.get('load_s'), '.2f')} | {fmt(r.get('file_mb'), '.1f')} | "
            f"{fmt(r.get('max_abs_err'), '.1e')} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", help="folder holding the reference repositories (see the docstring)")
    p.add_argument("--models", nargs="+", default=list(peers(None)), choices=list(peers(None)))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--json", help="write every row to this file, after each model")
    p.add_argument("--natten-rows", help=argparse.SUPPRESS)  # the natten rows' own process
    args = p.parse_args()
    if args.natten_rows:
        print(json.dumps(natten_rows(args.natten_rows, args.runs)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args.refs, args.runs, tmp)
            print(table([r for r in rows if r["model"] == name]).split("\n", 2)[-1], flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print(table(rows))


if __name__ == "__main__":
    main()
