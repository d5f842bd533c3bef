"""dyntok against the official code of ToMe, EViT, DynamicViT, DVT and AdaViT: the same weights, the same
computation, side by side.

For each size and method, dyntok's model is built at the method's paper budget (``vit_cifar_micro``: the shipped
weights, or the shipped dense reference for a method without its own; ``deit_small``: random weights, seed 0), and
the official model of the same architecture is built from a clone of the official repository and given the same
weights (``dyntok.convert.to_official``). Before anything is timed, both classify a few random images: the top-1
classes must be equal and the logits close, or the row says they disagree and nothing is timed (a speed comparison
of two different computations says nothing). Then both run interleaved in one process (docs/measurement.md):
latency at batch 1 and throughput at ``--batch``, float32 on CPU, dyntok with ``explain = False`` (no extras
recorded; the official forwards record none). The Python function calls of one batch-1 forward are counted too.

Each official model runs the way its own evaluation runs it, which is what its users get:

* DVT (``models_deit.py``, DeiT-S at 224 px only: its grids, reuse widths and resampling sizes are hard-coded)
  runs all three stages on every image and picks each image's exit afterwards, by ``inference.py``'s rule (the
  first exit whose softmax confidence reaches its threshold). Both use the thresholds that make the published exit
  shares q^k, q = 0.5, fitted on other random images; dyntok's model is built with the published options
  (padded middle stage, nearest-then-average-pool resampling, zeros at the class position), and what is compared
  is the logits of the exit each image takes.
* AdaViT (``models/ada_t2t_vit.py``: ``AdaStepT2T_ViT`` without its T2T stem, the plain-ViT form of the released
  Ada-DeiT-S, buildable at any ViT shape) masks patches, heads and blocks and computes everything. Its decision
  thresholds are set to take dyntok's decisions (dyntok decides on ``sigmoid(logit / T)``, the official inference
  on ``sigmoid(logit)``): at the paper's thresholds with the shipped weights, and with random weights (whose
  decisions keep arbitrary shares there) at thresholds fitted on other random images to the published usage, 0.5.
* ReViT has no official code: its row says so.

The official code is never part of dyntok: clone it yourself, into one folder, and point the script at it::

    git clone https://github.com/facebookresearch/ToMe      OFFICIAL/ToMe
    git clone https://github.com/youweiliang/evit          OFFICIAL/evit
    git clone https://github.com/raoyongming/DynamicViT    OFFICIAL/DynamicViT
    git clone https://github.com/blackfeather-wang/Dynamic-Vision-Transformer OFFICIAL/Dynamic-Vision-Transformer
    git clone https://github.com/MengLcool/AdaViT          OFFICIAL/AdaViT
    python benchmarks/official_speed.py --official-root OFFICIAL                    # micro and DeiT-S, every method
    python benchmarks/official_speed.py --official-root OFFICIAL --sizes deit_small --methods evit --repeats 9
    python benchmarks/official_speed.py --official-root OFFICIAL --smoke            # seconds: checks the script runs

The DVT and AdaViT clones need small edits to run on current timm and on a CPU (docs/deploy.md lists them). A
missing clone skips its method with a row naming the repository to clone. Writes ``results.json`` and
``README.md`` into ``--output`` (default ``reports/official_speed``).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence
from unittest import mock

import torch
from torch import Tensor, nn

import dyntok
from dyntok.convert import to_official
from dyntok.convert.adavit import threshold_for_official_code
from dyntok.measure.speed import measure_latency, measure_throughput
from dyntok.methods import AdaptiveViT
from dyntok.models.vit import BackboneSpec
from dyntok.pretrained import available
from dyntok.training.distributed import select_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_at_scale import backbone_name, budget_text, environment  # noqa: E402  (a sibling script, not a package)

DEFAULT_SIZES = ("vit_cifar_micro", "deit_small")
#: Where the weights of a dyntok model without shipped weights come from.
RANDOM = "random, seed 0"
#: A run of seconds that exercises every path of the script (numbers meaningless).
SMOKE = dict(sizes=["vit_cifar_nano"], batch=4, images=8, latency_images=2, repeats=1, check_images=2)


# --------------------------------------------------------------------------------------------- the official models
def import_official(clone: Path, module: str) -> ModuleType:
    """``module`` imported from ``clone`` the way the clone's own scripts import it (its folder first on the path).

    Afterwards the clone's generic top-level helpers (``utils``, ``helpers``) are forgotten, so that the next clone
    finds its own; and its ``@register_model`` functions are not registered with timm, because EViT's would
    replace timm's ``deit_*`` entries, which dyntok builds its DeiT backbones from.
    """
    before = set(sys.modules)
    sys.path.insert(0, str(clone))
    try:
        with _timm_registry_untouched(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the official code imports timm's deprecated paths
            return importlib.import_module(module)
    finally:
        sys.path.remove(str(clone))
        package = module.split(".")[0]
        for name in set(sys.modules) - before:
            origin = getattr(sys.modules[name], "__file__", None) or ""
            if name.split(".")[0] != package and Path(origin).is_relative_to(clone):
                del sys.modules[name]


@contextlib.contextmanager
def _timm_registry_untouched():
    import timm.models
    from timm.models import _registry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        shim = importlib.import_module("timm.models.registry")

    def unregistered(function: Callable) -> Callable:
        return function

    with contextlib.ExitStack() as stack:
        for owner in (shim, timm.models, _registry):
            stack.enter_context(mock.patch.object(owner, "register_model", unregistered))
        yield


def deit_shape(vit: nn.Module) -> dict[str, Any]:
    """The constructor arguments of an official DeiT-style model shaped like the timm ViT ``vit``."""
    return dict(img_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
                embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=vit.blocks[0].attn.num_heads,
                mlp_ratio=vit.blocks[0].mlp.fc1.out_features / vit.embed_dim, num_classes=vit.num_classes)


def official_tome(clone: Path, model: AdaptiveViT) -> nn.Module:
    """A timm ViT with dyntok's weights, patched by ``tome.patch.timm``, merging dyntok's ``r`` per block with
    dyntok's choice of proportional attention."""
    tome = import_official(clone, "tome")
    vit = BackboneSpec(**model.config["backbone"]).build()
    vit.load_state_dict(to_official("tome", model.state_dict()))
    tome.patch.timm(vit, prop_attn=model.proportional_attention)
    vit.r = model.r_per_block()
    return vit


def official_evit(clone: Path, model: AdaptiveViT) -> nn.Module:
    """EViT's own ViT, reorganising after the attention of dyntok's blocks at its keep rate, fusing as it does."""
    evit = import_official(clone, "evit")
    keep_rate = [model.keep_rate if index in model.prune_locations else 1 for index in range(len(model.vit.blocks))]
    official = evit.EViT(**deit_shape(model.vit), keep_rate=keep_rate, fuse_token=model.fuse_inattentive)
    official.load_state_dict(to_official("evit", model.state_dict()))
    return official


def official_dynamicvit(clone: Path, model: AdaptiveViT) -> nn.Module:
    """``VisionTransformerDiffPruning`` (``models/dyvit.py``, or the older ``vit.py``) pruning before dyntok's
    blocks to its keep ratios; its eval forward really removes the tokens."""
    module = import_official(clone, "models.dyvit" if (clone / "models" / "dyvit.py").is_file() else "vit")
    with contextlib.redirect_stdout(None):  # its constructor prints a banner
        official = module.VisionTransformerDiffPruning(**deit_shape(model.vit), pruning_loc=list(model.prune_locations),
                                                       token_ratio=model.stage_keep_ratios())
    official.load_state_dict(to_official("dynamicvit", model.state_dict()))
    return official


class ExitsAsInference(nn.Module):
    """The official DVT as its ``inference.py`` uses it: every stage runs on every image, then each image takes the
    logits of the first exit whose softmax confidence reaches that exit's threshold (the last exit's otherwise)."""

    def __init__(self, dvt: nn.Module, thresholds: Sequence[float]) -> None:
        super().__init__()
        self.dvt, self.thresholds = dvt, list(thresholds)

    def forward(self, images: Tensor) -> Tensor:
        exits = self.dvt(images)
        chosen = exits[-1]
        for logits, threshold in reversed(list(zip(exits[:-1], self.thresholds))):
            leaves = logits.softmax(dim=-1).amax(dim=-1) >= threshold
            chosen = torch.where(leaves[:, None], logits, chosen)
        return chosen


def official_dvt(clone: Path, model: AdaptiveViT) -> nn.Module:
    """``DVT_Deit_small`` (``models_deit.py`` on the repository's own ``timm/models/vision_transformer.py``) with
    dyntok's weights, exiting at dyntok's thresholds the way ``inference.py`` does."""
    module = import_official(clone, "models_deit")
    official = module.DVT_Deit_small(num_classes=model.num_classes)
    official.load_state_dict(to_official("dvt", model.state_dict()))
    return ExitsAsInference(official, model.get_budget()["thresholds"])


class FirstOutput(nn.Module):
    """The logits of a model that returns them first in a tuple (AdaViT's forward adds its decisions)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)[0]


def official_adavit(clone: Path, model: AdaptiveViT) -> nn.Module:
    """``AdaStepT2T_ViT`` without the T2T stem (the released Ada-DeiT-S's class, ``ada_step_deit_small_patch16_224``
    at DeiT-S) shaped like dyntok's backbone, with its weights, deciding as dyntok does at its budget."""
    module = import_official(clone, "models.ada_t2t_vit")
    with contextlib.redirect_stdout(None):  # its constructor prints which decisions it takes
        official = module.AdaStepT2T_ViT(use_t2t=False, **deit_shape(model.vit), qkv_bias=True,
                                         norm_layer=partial(nn.LayerNorm, eps=1e-6), ada_head=True, ada_layer=True,
                                         ada_token=True, ada_token_with_mlp=True, keep_layers=1)
    official.load_state_dict(to_official("adavit", model.state_dict()))
    threshold = {name: threshold_for_official_code(value, model.temperature)
                 for name, value in model.thresholds.items()}
    for block in official.blocks:
        for select, policy in ((block.attn.token_select, "patch"), (block.head_select, "head"),
                               (block.layer_select, "block")):
            if select is not None:
                select.threshold = threshold[policy]
    return FirstOutput(official)


def published_exit_shares(model: AdaptiveViT, images: Tensor) -> dict[str, Any]:
    """DVT's thresholds fitted on ``images`` to the published exit shares q^k, q = 0.5 (4/7, 2/7, 1/7)."""
    return model.calibrate([(images, None)], q=0.5)


def published_usage(model: AdaptiveViT, images: Tensor) -> dict[str, Any]:
    """AdaViT's thresholds fitted on ``images`` so that each policy keeps the published usage target, 0.5."""
    return model.calibrate([(images, None)], usage=0.5)


@dataclass(frozen=True)
class OfficialCode:
    folder: str
    url: str
    build: Callable[[Path, AdaptiveViT], nn.Module]
    #: The only backbones the official code builds (empty: any), and why.
    backbones: tuple[str, ...] = ()
    why_only: str = ""
    #: dyntok options that make its model the official architecture.
    options: dict[str, Any] = field(default_factory=dict)
    #: The budget both run at when dyntok's weights are random (untrained decisions keep arbitrary shares at the
    #: paper's thresholds), fitted on images neither is timed on; None: the paper budget whatever the weights.
    untrained_budget: Callable[[AdaptiveViT, Tensor], dict[str, Any]] | None = None


#: The methods with official code to compare with: the clone's folder under --official-root, where to get it, and
#: how to build the official model running what a dyntok model runs.
OFFICIAL = {
    "tome": OfficialCode("ToMe", "https://github.com/facebookresearch/ToMe", official_tome),
    "evit": OfficialCode("evit", "https://github.com/youweiliang/evit", official_evit),
    "dynamicvit": OfficialCode("DynamicViT", "https://github.com/raoyongming/DynamicViT", official_dynamicvit),
    "dvt": OfficialCode(
        "Dynamic-Vision-Transformer", "https://github.com/blackfeather-wang/Dynamic-Vision-Transformer", official_dvt,
        backbones=("deit_small_patch16_224",),
        why_only="the official DVT is DeiT-S at 224 px only (its grids 7/10/14, reuse widths 128/48 and "
                 "resampling sizes are hard-coded): nothing to compare at this size",
        options={"padded_patches": True, "reuse_resampling": "nearest-avgpool", "reuse_class_fill": "zeros"},
        untrained_budget=published_exit_shares),
    "adavit": OfficialCode("AdaViT", "https://github.com/MengLcool/AdaViT", official_adavit,
                           untrained_budget=published_usage),
}
#: Methods without official code, and what their row says.
NO_OFFICIAL_CODE = {"revit": "no official code exists (ReViT + TLA is rebuilt from its papers): nothing to compare"}


# --------------------------------------------------------------------------------------------- dyntok's side
def dyntok_model(method: str, size: str, **options: Any) -> tuple[AdaptiveViT, str]:
    """dyntok's model (with ``options``) at its paper budget, and where its weights come from: its shipped weights,
    else the shipped dense reference of its backbone, else random (seed 0)."""
    backbone = backbone_name(size)
    name = f"{method}_{backbone}"
    torch.manual_seed(0)
    if available(name):
        model, weights = dyntok.create_model(name, pretrained=True, **options), "shipped"
    elif available(backbone):
        model, weights = dyntok.create_model(name, pretrained="reference", **options), "shipped dense reference"
    else:
        model, weights = dyntok.create_model(name, **options), RANDOM
    model.set_budget(**model.paper_budget())
    model.explain = False
    return model.eval(), weights


# --------------------------------------------------------------------------------------------- measuring
def agreement(model: AdaptiveViT, official: nn.Module, images: Tensor, atol: float) -> dict[str, Any]:
    """Whether both compute the same function on ``images``: equal top-1 classes and logits within ``atol``."""
    with torch.inference_mode():
        ours, theirs = model.predict(images).logits.float(), official(images).float()
    difference = (ours - theirs).abs().max().item()
    same_top1 = bool((ours.argmax(dim=-1) == theirs.argmax(dim=-1)).all())
    return {"same_top1": same_top1, "max_abs_logit_diff": difference, "agree": same_top1 and difference <= atol}


def python_calls(forward: Callable[[Tensor], object], image: Tensor) -> int:
    """Python function calls one ``forward(image)`` makes after a first, warming call: the interpreter overhead a
    batch-1 caller pays on every image."""
    calls = 0

    def count(frame, event, arg) -> None:
        nonlocal calls
        calls += event == "call"

    with torch.inference_mode():
        forward(image)
        sys.setprofile(count)
        try:
            forward(image)
        finally:
            sys.setprofile(None)
    return calls


def nothing_to_compare(row: dict[str, Any], official_root: Path) -> dict[str, Any] | None:
    """The row of a method with no official model to run at this size (its status and why), else None."""
    method = row["method"]
    if method in NO_OFFICIAL_CODE:
        return {**row, "status": "no official code", "note": NO_OFFICIAL_CODE[method]}
    code = OFFICIAL[method]
    if code.backbones and row["backbone"] not in code.backbones:
        return {**row, "status": "not comparable", "note": code.why_only}
    clone = official_root / code.folder
    if not clone.is_dir():
        print(f"{method}: no clone at {clone}; git clone {code.url} {clone}", flush=True)
        return {**row, "status": "skipped", "note": f"no clone of {code.url} in --official-root"}
    return None


def measure_method(method: str, size: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row: the agreement check, then (if they agree) both timed interleaved."""
    row: dict[str, Any] = {"size": size, "backbone": backbone_name(size), "method": method}
    if (skipped := nothing_to_compare(row, args.official_root)) is not None:
        return skipped
    code, clone = OFFICIAL[method], args.official_root / OFFICIAL[method].folder
    model, row["weights"] = dyntok_model(method, size, **code.options)
    images = torch.randn(args.images, *model.input_size, generator=torch.Generator().manual_seed(0))
    if code.untrained_budget is not None and row["weights"] == RANDOM:
        others = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        model.set_budget(**code.untrained_budget(model, others))
    row["budget"] = model.get_budget()
    try:
        official = code.build(clone, model).to(device).eval()
        model.to(device)
        row["agreement"] = agreement(model, official, images[:args.check_images].to(device), args.atol)
    except Exception as error:  # the official code is not ours: whatever it raises is reported, not fixed here
        return {**row, "status": "failed", "note": f"official code: {type(error).__name__}: {error}"}
    if not row["agreement"]["agree"]:
        return {**row, "status": "disagrees", "note": "different computations: not timed"}
    predictors = {"dyntok": model.predict, "official": official}
    latency = measure_latency(predictors, images[:args.latency_images], args.repeats, device=device, progress=False)
    throughput = measure_throughput(predictors, images, args.batch, args.repeats, device=device, progress=False)
    first = images[:1].to(device)
    return {**row, "status": "measured",
            "dyntok_latency_ms": latency["dyntok"].value, "official_latency_ms": latency["official"].value,
            "latency_ratio": latency["official"].value / latency["dyntok"].value,
            "dyntok_images_per_s": throughput["dyntok"].value, "official_images_per_s": throughput["official"].value,
            "throughput_ratio": throughput["dyntok"].value / throughput["official"].value,
            "dyntok_calls": python_calls(model.predict, first), "official_calls": python_calls(official, first)}


# --------------------------------------------------------------------------------------------- the report
def render_markdown(results: dict[str, Any]) -> str:
    run, env, settings = results["run"], results["run"]["environment"], results["run"]["settings"]
    command = " ".join(["python benchmarks/official_speed.py", *run["argv"]])
    lines = ["# dyntok against the official implementations", "",
             "Each method's dyntok model and the official code's model of the same architecture, with the same "
             "weights, at the paper's budget (with random weights, DVT's and AdaViT's thresholds fitted on other random "
             "images to the published exit shares and usage; benchmarks/README.md), timed interleaved in one process "
             "(docs/measurement.md). The official DVT runs every stage and picks each image's exit afterwards, the "
             "official AdaViT masks what it drops: what its users get. Before timing, "
             f"both classify {settings['check_images']} random images: **agree** = equal top-1 classes and logits "
             f"within {settings['atol']:g} (the largest difference is shown).", "",
             f"- `{command}` on {env.get('gpu') or env['cpu']} ({env['device']}, {env['cpu_count']} CPUs, "
             f"{env['threads']} torch threads), torch {env['torch']}, {env['precision']}, {env['date']}: batch-1 "
             f"latency over {settings['latency_images']} images, throughput at batch {settings['batch']} over "
             f"{settings['images']} images, median of {settings['repeats']} repetitions",
             "- **b=1 official / dyntok** = official latency / dyntok latency (above 1: dyntok is faster); "
             f"**b={settings['batch']} dyntok / official** = dyntok throughput / official throughput (above 1: dyntok "
             "is faster); **Python calls** = Python function calls of one batch-1 forward", ""]
    for size in dict.fromkeys(row["size"] for row in results["rows"]):
        rows = [row for row in results["rows"] if row["size"] == size]
        lines += [f"## {rows[0]['backbone']}", "",
                  f"| method | budget | weights | agree (max \\|Δlogit\\|) | dyntok b=1 ms | official b=1 ms | "
                  f"b=1 official / dyntok | b={settings['batch']} dyntok / official | Python calls dyntok / official |",
                  "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [_table_line(row) for row in rows]
        lines.append("")
    return "\n".join(lines)


def _table_line(row: dict[str, Any]) -> str:
    budget = budget_text(row.get("budget", {}))
    check = row.get("agreement")
    agree = f"{'yes' if check['agree'] else 'NO'} ({check['max_abs_logit_diff']:.1e})" if check else "-"
    if row["status"] != "measured":
        return f"| {row['method']} | {budget} | {row.get('weights', '-')} | {agree} | {row['note']} | | | | |"
    return (f"| {row['method']} | {budget} | {row['weights']} | {agree} | {row['dyntok_latency_ms']:.2f} | "
            f"{row['official_latency_ms']:.2f} | {row['latency_ratio']:.2f} | {row['throughput_ratio']:.2f} | "
            f"{row['dyntok_calls']} / {row['official_calls']} |")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--official-root", type=Path, required=True,
                        help="folder holding the clones: " + ", ".join(code.folder for code in OFFICIAL.values()))
    parser.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help="comma-separated dyntok presets or DeiT sizes")
    parser.add_argument("--methods", default=",".join([*OFFICIAL, *NO_OFFICIAL_CODE]),
                        help=f"comma-separated subset of {', '.join([*OFFICIAL, *NO_OFFICIAL_CODE])}")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch")
    parser.add_argument("--images", type=int, default=128, help="images per throughput pass")
    parser.add_argument("--latency-images", type=int, default=32, help="images timed one by one for latency")
    parser.add_argument("--check-images", type=int, default=8, help="images the agreement check classifies")
    parser.add_argument("--atol", type=float, default=1e-3, help="largest logit difference that still agrees")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--output", type=Path, default=Path("reports/official_speed"))
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny model, one repeat (numbers meaningless)")
    args = parser.parse_args(argv)
    args.sizes = [size for size in args.sizes.split(",") if size]
    args.methods = [method for method in args.methods.split(",") if method]
    unknown = sorted(set(args.methods) - set(OFFICIAL) - set(NO_OFFICIAL_CODE))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join([*OFFICIAL, *NO_OFFICIAL_CODE])}")
    if args.smoke:
        vars(args).update(SMOKE)
    args.official_root = args.official_root.resolve()
    return args


def shareable(argv: Sequence[str]) -> list[str]:
    """The command line as the report shows it: the clones' folder, a path of this machine, as ``OFFICIAL``."""
    shown = list(argv)
    for index, arg in enumerate(shown):
        if arg.startswith("--official-root="):
            shown[index] = "--official-root=OFFICIAL"
        elif arg == "--official-root" and index + 1 < len(shown):
            shown[index + 1] = "OFFICIAL"
    return shown


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = select_device(args.device)
    rows = []
    for size in args.sizes:
        for method in args.methods:
            rows.append(measure_method(method, size, args, device))
            print(json.dumps({key: rows[-1].get(key) for key in ("size", "method", "status", "agreement",
                                                                  "latency_ratio", "throughput_ratio")}), flush=True)
    settings = {key: getattr(args, key) for key in ("batch", "images", "latency_images", "check_images", "atol",
                                                     "repeats")}
    run = {"argv": shareable(sys.argv[1:] if argv is None else argv), "environment": environment(device),
           "settings": settings}
    results = {"run": run, "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False))
    (args.output / "README.md").write_text(render_markdown(results))
    print(f"wrote {args.output / 'results.json'} and {args.output / 'README.md'}")
    return results


if __name__ == "__main__":
    main()
