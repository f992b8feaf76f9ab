"""Methods: train-step time and memory of every pre-training method, its overhead, and MAE-3D vs MONAI.

A *step* is what Lightning's automatic optimisation runs: ``shared_step`` (masking, teacher,
losses; panel volumes are only built on the steps the panel callback captures), ``backward``,
``on_before_optimizer_step``, the module's own AdamW (``configure_optimizers``), and
``after_optimizer_step`` (EMA teacher update). Inputs are batch 2 of random volumes (two views per
item for SMIT).

Overhead: each method is timed, interleaved in the same process, next to

* **bare** — the networks the method trains (encoder, decoders, heads) on the same input with a
  fixed mask and a plain loss, forward + backward + the same AdamW step: what any framework must
  spend to train those networks. Found the same way for every method: one step is recorded, and
  every outermost call into the method's ``networks()`` made with gradients is replayed on its
  recorded inputs (so the same mask), its outputs' means summed as the loss (:func:`bare_networks`);
* **extra** — the method's additional gradient-free forward (EMA teacher, HybridMIM's dropout
  twin), which is part of the method's definition, not bookkeeping: the recorded step's network
  calls made without gradients, replayed.

``step / bare`` is the overhead ratio; ``step / (bare + extra)`` shows how much of it is masking and
bookkeeping once the teacher's own compute is accounted for.

Methods come from :data:`METHODS`: one line per method (class, benchmark size);
a method whose module does not import yet is skipped with a note.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import interleaved_timings, ratio, run_isolated, table, target

BATCH_SIZE = 2
OVERHEAD_TARGET = 1.2  # step / bare networks


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method: import path, constructor arguments (ROI added per run)."""

    name: str
    cls: str
    kwargs: dict[str, Any]
    size: str  # "recipe" or how and why the model was shrunk
    views: bool = False  # the batch carries two views per item (SMIT)
    #: constructor arguments that set the input size for an ROI (a side or 3 sides): the image size, or VoCo's crop grid
    size_arguments: Callable[[int | tuple[int, int, int]], dict[str, Any]] = lambda roi: {"img_size": roi}
    quick: dict[str, Any] = field(default_factory=dict)  # --quick: tiny overrides to debug the script fast

    def load(self) -> type:
        module, _, name = self.cls.rpartition(".")
        return getattr(importlib.import_module(module), name)


def _sides(roi: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (roi,) * 3 if isinstance(roi, int) else tuple(roi)


_VIT_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=384, decoder_depth=8, decoder_heads=12)
_VIT_TINY = dict(embed_dim=96, depth=2, num_heads=2, decoder_dim=48, decoder_depth=1, decoder_heads=2)
#: Swin and CNN methods at recipe widths take 10–90 s per 96³ step on 2 CPU cores (the whole benchmark must
#: fit in ~20 min), so they run at documented small widths; the ViT methods run at their recipe size.
_SWIN_SMALL = dict(feature_size=12, depths=[1, 1, 1, 1])

METHODS: list[MethodSpec] = [
    MethodSpec("MAE-3D", "lightning_mim.methods.mae.MAE3D", dict(_VIT_B), "recipe: ViT-B/16, decoder 384/8",
               quick=_VIT_TINY),
    MethodSpec("SimMIM-3D", "lightning_mim.methods.simmim.SimMIM3D", dict(encoder="swin_unetr", **_SWIN_SMALL),
               "small: Swin F 12, 1 block/stage (recipe F 48, 2-2-2-2)"),
    MethodSpec("SMIT", "lightning_mim.methods.smit.SMIT",
               dict(encoder="swin_smit", feature_size=24, depths=[1, 1, 1, 1], drop_path_rate=0.0),
               "small: Swin F 24, 1 block/stage, no drop-path (recipe F 48, 2-2-4-2, 0.3); DINO heads as recipe",
               views=True, quick=dict(feature_size=12, out_dim=512, head_hidden_dim=256, head_bottleneck_dim=64)),
    MethodSpec("SelfMedHPM", "lightning_mim.methods.selfmedhpm.SelfMedHPM",
               dict(_VIT_B, predictor_dim=384, predictor_depth=8, predictor_heads=12),
               "recipe: ViT-B/16, decoder and loss predictor 384/8",
               quick=dict(_VIT_TINY, predictor_dim=48, predictor_depth=1, predictor_heads=2)),
    MethodSpec("AnatoMask", "lightning_mim.methods.anatomask.AnatoMask",
               dict(encoder_dims=[8, 16, 32, 64, 128], decoder_width=128),
               "small: STU-Net widths 8…128, decoder 128 (recipe 32…512 / 512 at 112×112×128)",
               quick=dict(encoder_dims=[4, 8, 16, 32, 64], decoder_width=64)),
    MethodSpec("HybridMIM (Swin)", "lightning_mim.methods.hybridmim.HybridMIM",
               dict(backbone="swin", **_SWIN_SMALL), "small: Swin UNETR F 12, 1 block/stage (recipe F 48, 2-2-2-2)"),
    MethodSpec("HybridMIM (UNet)", "lightning_mim.methods.hybridmim.HybridMIM",
               dict(backbone="unet", unet_channels=[8, 8, 16, 32, 64]), "small: DeepUNet channels 8…64 (recipe 64…512)",
               quick=dict(unet_channels=[4, 4, 8, 8, 16])),
    MethodSpec("SimCLR-3D", "lightning_mim.methods.simclr.SimCLR3D", dict(unet_channels=[8, 16, 32, 64, 80]),
               "small: UNet encoder 8…80 (recipe 32…320), projector 2048³ as recipe", views=True,
               quick=dict(unet_channels=[4, 8, 8, 16, 16], projector_hidden_dim=32, projector_dim=16)),
    MethodSpec("Models Genesis", "lightning_mim.methods.models_genesis.ModelsGenesis",
               dict(unet_channels=[16, 32, 64, 128], shuffle_blocks=10_000),
               "small: UNet 16…128 (recipe 64…512); 10,000 shuffle blocks per 64×64×32 voxels",
               quick=dict(unet_channels=[4, 8, 8, 16], shuffle_blocks=500)),
    MethodSpec("Volume Fusion", "lightning_mim.methods.volume_fusion.VolumeFusion",
               dict(unet_channels=[8, 16, 32, 64, 128]), "small: UNet 8…128 (recipe 32…512)",
               quick=dict(unet_channels=[4, 8, 8, 16, 16])),
    MethodSpec("Swin UNETR SSL", "lightning_mim.methods.swinunetr_ssl.SwinUNETRSSL", dict(**_SWIN_SMALL),
               "small: Swin F 12, 1 block/stage (recipe F 48, 2-2-2-2)"),
    MethodSpec("VoCo", "lightning_mim.methods.voco.VoCo", dict(**_SWIN_SMALL, projector_hidden_dim=1024, projector_dim=1024),
               "small: Swin F 12, 1 block/stage (recipe F 48, 2-2-2-2); the ROI is the region, a grid of 32³ crops "
               "(recipe 3×3×1 of 64³) + 2 random crops per volume; projector 1024² as recipe",
               size_arguments=lambda roi: {"crop_size": 32, "grid": [side // 32 for side in _sides(roi)]},
               quick=dict(feature_size=6, projector_hidden_dim=32, projector_dim=16)),
    MethodSpec("DINOv2-3D", "lightning_mim.methods.dinov2.DINOv2",
               dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, out_dim=16384, local_size=32,
                    num_local_crops=8, drop_path_rate=0.0),
               "recipe ViT-B/16 with 16,384 prototypes (recipe 65,536), 8 local crops of 32³ (recipe 48³), no drop-path",
               quick=dict(embed_dim=48, depth=1, num_heads=2, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                          num_local_crops=2, local_size=16)),
]

#: MAE-3D at the dimensions of the MONAI comparison (hidden 384, 6 layers, 6 heads; decoder 192 / 2 layers).
MAE_MONAI_DIMS = MethodSpec(
    "MAE-3D (MONAI dims)", "lightning_mim.methods.mae.MAE3D",
    dict(patch_size=16, embed_dim=384, depth=6, num_heads=6, decoder_dim=192, decoder_depth=2, decoder_heads=6,
         mask_ratio=0.75), "hidden 384, 6×6 heads, decoder 192/2")


def spec_named(name: str) -> MethodSpec:
    for spec in [*METHODS, MAE_MONAI_DIMS]:
        if spec.name == name:
            return spec
    raise KeyError(name)


# --------------------------------------------------------------------------- building one step
def stub_trainer() -> SimpleNamespace:
    """What the modules read from a Trainer during a step (schedules, teacher momentum)."""
    return SimpleNamespace(max_steps=-1, max_epochs=100, num_training_batches=100, accumulate_grad_batches=1,
                           estimated_stepping_batches=10_000,
                           global_step=0, global_rank=0, current_epoch=0, datamodule=None)


def build_method(spec: MethodSpec, roi: int | tuple[int, int, int], **overrides: Any):
    """(module in train mode, its AdamW from ``configure_optimizers``, a batch); ``roi`` is a side or 3 sides."""
    torch.manual_seed(0)
    module = spec.load()(**spec.size_arguments(roi), **{**spec.kwargs, **overrides})
    module._trainer = stub_trainer()
    module.train()
    optimizer = module.configure_optimizers()["optimizer"]
    size = _sides(roi)
    images = torch.rand(BATCH_SIZE, 2 if spec.views else 1, 1, *size)
    batch = {"image": images[:, 0], "case_id": [str(i) for i in range(BATCH_SIZE)]}
    if spec.views:
        batch["views"] = images
    return module, optimizer, batch


def method_step(module, optimizer, batch) -> Callable[[], Tensor]:
    def step() -> Tensor:
        loss = module.shared_step(batch).losses["loss"]
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.after_optimizer_step()
        return loss.detach()

    return step


def optimizer_step(loss_fn: Callable[[], Tensor], optimizer) -> Callable[[], Tensor]:
    def step() -> Tensor:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


# --------------------------------------------------------------------------- bare networks, every method alike
@dataclass
class NetworkCall:
    """One outermost call of a network (or of a module inside one) during a method's step, ready to replay."""

    network: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    trained: bool  # autograd was on and the network has trainable parameters (else: teacher / no-grad twin)


def _frozen_inputs(value: Any) -> Any:
    """``value`` with every tensor detached; one that carried gradients in the step requires them again."""
    if isinstance(value, Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_frozen_inputs(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen_inputs(v) for k, v in value.items()}
    return value


def _tensors_with_gradients(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value] if value.requires_grad else []
    if dataclasses.is_dataclass(value):
        value = [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_with_gradients(v)]
    return []


def record_network_calls(module, batch) -> list[NetworkCall]:
    """The outermost calls into ``module.networks()`` (the networks or any of their modules) during one step."""
    calls: list[NetworkCall] = []
    depth = [0]

    def enter(network: nn.Module, args: tuple, kwargs: dict) -> None:
        if depth[0] == 0:
            trained = torch.is_grad_enabled() and any(p.requires_grad for p in network.parameters())
            calls.append(NetworkCall(network, _frozen_inputs(args), _frozen_inputs(kwargs), trained))
        depth[0] += 1

    def leave(network: nn.Module, args: tuple, output: Any) -> None:
        depth[0] -= 1

    inside = {id(m): m for network in module.networks().values() for m in network.modules()}
    hooks = [hook for m in inside.values() for hook in (m.register_forward_pre_hook(enter, with_kwargs=True),
                                                         m.register_forward_hook(leave))]
    try:
        module.shared_step(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def bare_networks(module, batch) -> tuple[Callable[[], Tensor], Callable[[], None] | None]:
    """(loss of the trained networks' calls of one recorded step, replay of its gradient-free calls or None).

    The loss is the mean of every output that carries gradients: a plain loss over the same network
    calls, inputs and masks as the method's step, without its masking, targets, losses and bookkeeping.
    """
    calls = record_network_calls(module, batch)
    trained = [call for call in calls if call.trained]
    frozen = [call for call in calls if not call.trained]
    if not trained:
        raise RuntimeError(f"{type(module).__name__}'s step ran none of its networks with gradients")

    def loss() -> Tensor:
        outputs = [call.network(*call.args, **call.kwargs) for call in trained]
        return sum(tensor.float().mean() for tensor in _tensors_with_gradients(outputs))

    @torch.no_grad()
    def extra() -> None:
        for call in frozen:
            call.network(*call.args, **call.kwargs)

    return loss, extra if frozen else None


# --------------------------------------------------------------------------- child-process measurements
def time_method(name: str, roi: int, warmup: int = 1, repeats: int = 3, with_bare: bool = True,
                **overrides: Any) -> dict[str, Any]:
    """Median step time of a method, interleaved with its bare networks and its extra forward."""
    spec = spec_named(name)
    module, optimizer, batch = build_method(spec, roi, **overrides)
    steps = {"step": method_step(module, optimizer, batch)}
    if with_bare:
        loss, extra = bare_networks(module, batch)
        steps["bare"] = optimizer_step(loss, optimizer)
        if extra is not None:
            steps["extra"] = extra
    timings = interleaved_timings(steps, warmup=warmup, repeats=repeats)
    return {"timings": timings, "parameters": sum(p.numel() for p in module.parameters() if p.requires_grad)}


def saved_tensor_bytes(run: Callable[[], Any], parameters: set[int]) -> tuple[Any, int]:
    """Result of ``run`` and the bytes of distinct non-parameter storages autograd saved for backward."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values())


def profile_method(name: str, roi: int, steps: int = 1, **overrides: Any) -> dict[str, Any]:
    """FLOPs and saved-activation bytes of one forward + backward after ``steps`` train steps.

    In a fresh process the parent's peak RSS then covers weights, gradients, AdamW state and
    activations together (the first optimizer step allocates the state)."""
    from torch.utils.flop_counter import FlopCounterMode

    spec = spec_named(name)
    module, optimizer, batch = build_method(spec, roi, **overrides)
    step = method_step(module, optimizer, batch)
    for _ in range(steps):
        step()
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    counter = FlopCounterMode(display=False)
    with counter:
        out, activation_bytes = saved_tensor_bytes(lambda: module.shared_step(batch), parameters)
        out.losses["loss"].backward()
    optimizer.zero_grad(set_to_none=True)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return {"flops": counter.get_total_flops(), "activation_mb": activation_bytes / 2**20,
            "trainable_parameters": trainable, "frozen_parameters": frozen}


def _self_cpu_ms(step: Callable[[], Any]) -> dict[str, float]:
    """Self CPU time (ms) per operator of one call of ``step`` under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return {event.key: event.self_cpu_time_total / 1e3 for event in prof.key_averages()}


def profile_overhead(name: str, roi: int, rows: int = 8, **overrides: Any) -> dict[str, Any]:
    """The operators that make a method's step slower than its bare networks (profiled after a warm-up).

    Returns the ``rows`` operators with the largest self-CPU-time excess of the step over the bare
    step, each with both times, plus both totals.
    """
    spec = spec_named(name)
    module, optimizer, batch = build_method(spec, roi, **overrides)
    step = method_step(module, optimizer, batch)
    loss, _ = bare_networks(module, batch)
    bare = optimizer_step(loss, optimizer)
    step()  # warm-up: the first optimizer step allocates AdamW's state
    bare()
    ours, theirs = _self_cpu_ms(step), _self_cpu_ms(bare)
    excess = sorted(([op, ms, theirs.get(op, 0.0), ms - theirs.get(op, 0.0)] for op, ms in ours.items()),
                    key=lambda row: row[3], reverse=True)
    return {"top": excess[:rows],
            "step_total_ms": sum(ours.values()), "bare_total_ms": sum(theirs.values())}


def _monai_mae(roi: int):
    from monai.networks.nets import MaskedAutoEncoderViT

    torch.manual_seed(0)
    network = MaskedAutoEncoderViT(in_channels=1, img_size=roi, patch_size=16, hidden_size=384, mlp_dim=1536,
                                   num_layers=6, num_heads=6, masking_ratio=0.75, decoder_hidden_size=192,
                                   decoder_mlp_dim=768, decoder_num_layers=2, decoder_num_heads=6, qkv_bias=True)
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    images = torch.rand(BATCH_SIZE, 1, roi, roi, roi)

    def loss() -> Tensor:
        from lightning_mim.masking.grid import patchify

        pred, mask = network(images)
        target = patchify(images, 16)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (pred.float() - target).square().mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    return network, optimizer_step(loss, optimizer)


def time_mae_vs_monai(roi: int, warmup: int = 1, repeats: int = 5) -> dict[str, Any]:
    """Our MAE-3D step and MONAI's MaskedAutoEncoderViT step at equal dimensions, interleaved."""
    module, optimizer, batch = build_method(MAE_MONAI_DIMS, roi)
    network, monai_step = _monai_mae(roi)
    timings = interleaved_timings({"ours": method_step(module, optimizer, batch), "monai": monai_step},
                                  warmup=warmup, repeats=repeats)
    return {"timings": timings, "parameters": {"ours": sum(p.numel() for p in module.parameters()),
                                               "monai": sum(p.numel() for p in network.parameters())}}


def profile_monai_mae(roi: int, steps: int = 2) -> dict[str, Any]:
    """Two MONAI steps (the parent reads the peak RSS)."""
    _, step = _monai_mae(roi)
    for _ in range(steps):
        step()
    return {}


# --------------------------------------------------------------------------- orchestration
@dataclass(frozen=True)
class MethodBenchConfig:
    rois: tuple[int, ...] = (64, 96)
    warmup: int = 1
    repeats: int = 5
    monai_repeats: int = 7
    overrides: dict[str, Any] = field(default_factory=dict)  # applied to every method (quick mode: tiny models)
    only: tuple[str, ...] = ()  # table names of the methods to run (empty: all); the MONAI comparison always runs

    @staticmethod
    def full() -> MethodBenchConfig:
        return MethodBenchConfig()

    @staticmethod
    def quick() -> MethodBenchConfig:
        return MethodBenchConfig(rois=(64,), warmup=1, repeats=2, monai_repeats=3)


def method_overrides(spec: MethodSpec, quick: bool) -> dict[str, Any]:
    return dict(spec.quick) if quick else {}


def available_methods() -> tuple[list[MethodSpec], list[str]]:
    """The table's methods whose classes import, and a note for each one that does not (yet)."""
    found, missing = [], []
    for spec in METHODS:
        try:
            spec.load()
            found.append(spec)
        except (ImportError, AttributeError) as error:
            missing.append(f"{spec.name} skipped: {spec.cls} does not import ({error})")
    return found, missing


def _try(function, *args, **kwargs) -> dict[str, Any]:
    try:
        return run_isolated(function, *args, **kwargs)
    except Exception as error:  # noqa: BLE001 - a failing method must not hide the others
        return {"error": str(error)[-3000:]}


def median(run: dict, key: str) -> float | None:
    return run.get("timings", {}).get(key, {}).get("median_s")


def run(config: MethodBenchConfig, quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    methods, notes = available_methods()
    if config.only:
        unknown = sorted(set(config.only) - {spec.name for spec in METHODS})
        if unknown:
            raise ValueError(f"--methods: unknown {unknown}; choose from {[spec.name for spec in METHODS]}")
        methods = [spec for spec in methods if spec.name in config.only]
    runs: dict[str, Any] = {}
    for spec in methods:
        overrides = method_overrides(spec, quick)
        for roi in config.rois:
            log(f"methods: {spec.name} at {roi}³")
            key = f"{spec.name}@{roi}"
            runs[key] = {"timing": _try(time_method, spec.name, roi, config.warmup, config.repeats, **overrides),
                         "profile": _try(profile_method, spec.name, roi, **overrides), "overrides": overrides}
            overhead = ratio(median(runs[key]["timing"], "step"), median(runs[key]["timing"], "bare"))
            if overhead is not None and overhead > OVERHEAD_TARGET:
                log(f"methods: {spec.name} at {roi}³ is over the overhead target ({overhead:.2f}), profiling")
                runs[key]["overhead_profile"] = _try(profile_overhead, spec.name, roi, **overrides)
    monai_runs = {}
    for roi in config.rois:
        log(f"methods: MAE-3D vs MONAI MaskedAutoEncoderViT at {roi}³")
        monai_runs[roi] = {"timing": _try(time_mae_vs_monai, roi, config.warmup, config.monai_repeats),
                           "ours": _try(profile_method, MAE_MONAI_DIMS.name, roi),
                           "monai": _try(profile_monai_mae, roi)}
    return summarize(runs, monai_runs, methods, config, notes)


def _peak(run: dict) -> float | None:
    return run.get("process", {}).get("peak_rss_mb")


def summarize(runs: dict, monai_runs: dict, methods: list[MethodSpec], config: MethodBenchConfig,
              notes: list[str]) -> dict[str, Any]:
    rows, overhead_checks = [], []
    for spec in methods:
        for roi in config.rois:
            entry = runs.get(f"{spec.name}@{roi}", {})
            timing, profile = entry.get("timing", {}), entry.get("profile", {})
            step, bare, extra = median(timing, "step"), median(timing, "bare"), median(timing, "extra")
            overhead = ratio(step, bare)
            adjusted = ratio(step, None if bare is None else bare + (extra or 0.0))
            flops = profile.get("flops")
            error = timing.get("error") or profile.get("error")
            rows.append([spec.name, f"{roi}³", spec.size if not entry.get("overrides") else "quick: tiny", step, bare,
                         extra, overhead, adjusted, _peak(profile),
                         None if flops is None else flops / 1e9, profile.get("activation_mb"),
                         "failed (see JSON)" if error else ""])
            if overhead is not None:
                overhead_checks.append((spec.name, roi, overhead, adjusted))
    monai_rows, monai_ratios = [], []
    for roi, entry in monai_runs.items():
        ours, theirs = median(entry["timing"], "ours"), median(entry["timing"], "monai")
        value = ratio(ours, theirs)
        monai_ratios.append(value)
        monai_rows.append([f"{roi}³", ours, theirs, value, _peak(entry["ours"]), _peak(entry["monai"])])
    targets = []
    for name, roi, overhead, adjusted in overhead_checks:
        targets.append(target(f"methods: {name} {roi}³ step / bare networks", overhead, f"≤ {OVERHEAD_TARGET:g}",
                              overhead <= OVERHEAD_TARGET))
    for name, roi, overhead, adjusted in overhead_checks:
        targets.append(target(f"methods: {name} {roi}³ step / (bare networks + teacher or twin forward)", adjusted,
                              f"≤ {OVERHEAD_TARGET:g}", None if adjusted is None else adjusted <= OVERHEAD_TARGET))
    for (roi, _), value in zip(monai_runs.items(), monai_ratios):
        targets.append(target(f"methods: MAE-3D / MONAI MaskedAutoEncoderViT step, {roi}³", value, "≤ 0.8",
                              None if value is None else value <= 0.8))
    profile_tables = []
    for key, entry in runs.items():
        found = entry.get("overhead_profile", {})
        if found.get("top"):
            profile_tables.append(table(
                f"Where {key.replace('@', ' at ')}³ spends more than its bare networks (torch.profiler, one step, "
                f"self CPU ms; totals {found['step_total_ms']:.0f} vs {found['bare_total_ms']:.0f})",
                ["operator", "step ms", "bare ms", "excess ms"], found["top"]))
    columns = ["method", "ROI", "size", "step s", "bare s", "extra fwd s", "step / bare", "step / (bare + extra)",
               "peak RSS MB", "GFLOP / step", "saved activations MB", "note"]
    return {
        "title": "Methods (train step = forward + backward + AdamW, batch 2, fp32)",
        "config": {"rois": list(config.rois), "warmup": config.warmup, "repeats": config.repeats},
        "runs": runs,
        "monai_runs": {str(k): v for k, v in monai_runs.items()},
        "tables": [
            table("Train step per method", columns, rows, notes=[
                "step: the method's full step; bare: its trained networks with a fixed mask and a plain loss, same "
                "AdamW; extra fwd: its gradient-free teacher / dropout-twin forward (inherent to the method).",
                "Medians of interleaved steps after one warm-up, in one process per method and ROI.",
                "Peak RSS: a fresh process (imports ≈ its start RSS) running a step and a forward + backward; GFLOP: "
                "that forward + backward (torch.utils.flop_counter; teacher passes included, AdamW excluded); saved "
                "activations: distinct non-parameter tensors autograd keeps for backward.",
            ]),
            table("MAE-3D vs MONAI MaskedAutoEncoderViT (hidden 384, 6 layers, 6 heads; decoder 192, 2 layers; "
                  "patch 16; mask 0.75)", ["ROI", "ours s", "MONAI s", "ours / MONAI", "ours peak RSS MB",
                                           "MONAI peak RSS MB"], monai_rows),
            *profile_tables,
        ],
        "targets": targets,
        "notes": notes,
    }

